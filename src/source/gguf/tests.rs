//! Unit tests of the GGUF reader over files written byte by byte here (and the real SmolLM2 file when present).

use std::fs::File;
use std::path::{Path, PathBuf};

use half::{bf16, f16};
use serde_json::Value as Json;

use super::tensors::unpermute_rows;
use super::*;
use std::io::Write;
use std::sync::atomic::{AtomicUsize, Ordering};

// ---- a tiny GGUF writer -------------------------------------------------------------------------------

enum W {
    U32(u32),
    F32(f32),
    Bool(bool),
    Str(&'static str),
    StrArr(Vec<String>),
    I32Arr(Vec<i32>),
}

struct TensorSpec {
    name: String,
    dims: Vec<u64>, // GGUF order
    ty: u32,
    data: Vec<u8>,
    offset_override: Option<u64>,
}

fn put_str(b: &mut Vec<u8>, s: &str) {
    b.extend(str_bytes(s));
}

fn str_bytes(s: &str) -> Vec<u8> {
    (s.len() as u64).to_le_bytes().into_iter().chain(s.bytes()).collect()
}

fn array(elem_ty: u32, len: usize, items: impl Iterator<Item = u8>) -> Vec<u8> {
    elem_ty.to_le_bytes().into_iter().chain((len as u64).to_le_bytes()).chain(items).collect()
}

fn write_gguf(version: u32, kv: &[(&str, W)], tensors: &[TensorSpec]) -> Vec<u8> {
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(version.to_le_bytes());
    b.extend((tensors.len() as u64).to_le_bytes());
    b.extend((kv.len() as u64).to_le_bytes());
    for (k, v) in kv {
        put_str(&mut b, k);
        // (GGUF value type, encoded value); arrays are type 9 with their element type and length first.
        let (ty, value): (u32, Vec<u8>) = match v {
            W::U32(x) => (4, x.to_le_bytes().to_vec()),
            W::F32(x) => (6, x.to_le_bytes().to_vec()),
            W::Bool(x) => (7, vec![*x as u8]),
            W::Str(s) => (8, str_bytes(s)),
            W::StrArr(a) => (9, array(8, a.len(), a.iter().flat_map(|s| str_bytes(s)))),
            W::I32Arr(a) => (9, array(5, a.len(), a.iter().flat_map(|x| x.to_le_bytes()))),
        };
        b.extend(ty.to_le_bytes());
        b.extend(value);
    }
    let mut offsets = Vec::new();
    let mut off = 0u64;
    for t in tensors {
        offsets.push(t.offset_override.unwrap_or(off));
        off += (t.data.len() as u64).div_ceil(32) * 32;
    }
    for (t, o) in tensors.iter().zip(&offsets) {
        put_str(&mut b, &t.name);
        b.extend((t.dims.len() as u32).to_le_bytes());
        for d in &t.dims {
            b.extend(d.to_le_bytes());
        }
        b.extend(t.ty.to_le_bytes());
        b.extend(o.to_le_bytes());
    }
    while b.len() % 32 != 0 {
        b.push(0);
    }
    for t in tensors {
        b.extend(&t.data);
        while b.len() % 32 != 0 {
            b.push(0);
        }
    }
    b
}

static COUNTER: AtomicUsize = AtomicUsize::new(0);

struct TempFile(PathBuf);
impl Drop for TempFile {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}

fn temp(bytes: &[u8]) -> TempFile {
    let n = COUNTER.fetch_add(1, Ordering::SeqCst);
    let path = std::env::temp_dir().join(format!("dejavu-gguf-test-{}-{n}.gguf", std::process::id()));
    let mut f = File::create(&path).unwrap();
    f.write_all(bytes).unwrap();
    TempFile(path)
}

fn tensor(name: &str, dims: &[u64], ty: u32, data: Vec<u8>) -> TensorSpec {
    TensorSpec {
        name: name.into(),
        dims: dims.to_vec(),
        ty,
        data,
        offset_override: None,
    }
}

fn f16b(x: f32) -> [u8; 2] {
    f16::from_f32(x).to_le_bytes()
}

// ---- reference quantizers, written from the ggml block layouts ---------------------------------------

/// Q8_0 block from a scale and 32 signed codes; returns bytes and the expected values.
fn q8_0_block(d: f32, q: &[i8; 32]) -> (Vec<u8>, Vec<f32>) {
    let mut b = f16b(d).to_vec();
    b.extend(q.iter().map(|&x| x as u8));
    let dd = f16::from_f32(d).to_f32();
    (b, q.iter().map(|&x| x as f32 * dd).collect())
}

/// Q4_0 block: codes 0..16; byte k holds element k (low nibble) and element k+16 (high nibble).
fn q4_0_block(d: f32, q: &[u8; 32]) -> (Vec<u8>, Vec<f32>) {
    let mut b = f16b(d).to_vec();
    for k in 0..16 {
        b.push(q[k] | (q[k + 16] << 4));
    }
    let dd = f16::from_f32(d).to_f32();
    (b, q.iter().map(|&x| (x as f32 - 8.0) * dd).collect())
}

fn q4_1_block(d: f32, m: f32, q: &[u8; 32]) -> (Vec<u8>, Vec<f32>) {
    let mut b = f16b(d).to_vec();
    b.extend(f16b(m));
    for k in 0..16 {
        b.push(q[k] | (q[k + 16] << 4));
    }
    let dd = f16::from_f32(d).to_f32();
    let mm = f16::from_f32(m).to_f32();
    (b, q.iter().map(|&x| x as f32 * dd + mm).collect())
}

fn codes4(seed: u8) -> [u8; 32] {
    let mut q = [0u8; 32];
    for (i, x) in q.iter_mut().enumerate() {
        *x = ((i as u8).wrapping_mul(7).wrapping_add(seed)) % 16;
    }
    q
}

fn codes8(seed: i32) -> [i8; 32] {
    let mut q = [0i8; 32];
    for (i, x) in q.iter_mut().enumerate() {
        *x = (((i as i32) * 37 + seed) % 256 - 128) as i8;
    }
    q
}

fn assert_close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (i, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-6 * (1.0 + y.abs()), "element {i}: {x} vs {y}");
    }
}

#[test]
fn quant_types_round_trip() {
    // Two rows of 64 elements = 4 blocks for the block types; GGUF dims [64, 2] -> HF shape [2, 64].
    let mut q8 = (Vec::new(), Vec::new());
    let mut q40 = (Vec::new(), Vec::new());
    let mut q41 = (Vec::new(), Vec::new());
    for blk in 0..4 {
        let (b, v) = q8_0_block(0.01 * (blk + 1) as f32, &codes8(blk * 11));
        q8.0.extend(b);
        q8.1.extend(v);
        let (b, v) = q4_0_block(0.5 / (blk + 1) as f32, &codes4(blk as u8));
        q40.0.extend(b);
        q40.1.extend(v);
        let (b, v) = q4_1_block(0.25, -1.5 + blk as f32, &codes4(3 * blk as u8 + 1));
        q41.0.extend(b);
        q41.1.extend(v);
    }
    // Hand-checked values: Q4_0 with d = 0.5 and code 0 gives -4.0; Q4_1 with d=0.25, m=-1.5, code 15: 2.25.
    assert_eq!(q40.1[0], (codes4(0)[0] as f32 - 8.0) * 0.5);
    assert_eq!(codes4(0)[0], 0);
    assert_eq!(q40.1[0], -4.0);
    let vals: Vec<f32> = (0..128).map(|i| (i as f32 - 64.0) * 0.37).collect();
    let f32b: Vec<u8> = vals.iter().flat_map(|x| x.to_le_bytes()).collect();
    let f16v: Vec<f32> = vals.iter().map(|&x| f16::from_f32(x).to_f32()).collect();
    let f16bytes: Vec<u8> = vals.iter().flat_map(|&x| f16b(x)).collect();
    let bf16v: Vec<f32> = vals.iter().map(|&x| bf16::from_f32(x).to_f32()).collect();
    let bf16bytes: Vec<u8> = vals.iter().flat_map(|&x| bf16::from_f32(x).to_le_bytes()).collect();

    let file = write_gguf(
        3,
        &[("general.architecture", W::Str("llama"))],
        &[
            tensor("f32", &[64, 2], 0, f32b),
            tensor("f16", &[64, 2], 1, f16bytes),
            tensor("bf16", &[64, 2], 30, bf16bytes),
            tensor("q8_0", &[64, 2], 8, q8.0),
            tensor("q4_0", &[64, 2], 2, q40.0),
            tensor("q4_1", &[64, 2], 3, q41.0),
        ],
    );
    let tmp = temp(&file);
    let g = GgufFile::open(&tmp.0).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.tensor_names(), vec!["f32", "f16", "bf16", "q8_0", "q4_0", "q4_1"]);
    for (name, want) in [
        ("f32", &vals),
        ("f16", &f16v),
        ("bf16", &bf16v),
        ("q8_0", &q8.1),
        ("q4_0", &q40.1),
        ("q4_1", &q41.1),
    ] {
        let t = g.read_tensor(name).unwrap();
        assert_eq!(t.shape, vec![2, 64], "{name}");
        assert_close(&t.data, want);
    }
    // Spot-check a nibble layout by hand: block 0 of q4_1 uses codes4(1): element 0 = 1, element 16 = (16*7+1)%16 = 1.
    let t = g.read_tensor("q4_1").unwrap();
    assert_eq!(t.data[0], 1.0 * 0.25 - 1.5);
    assert_eq!(t.data[1], 8.0 * 0.25 - 1.5); // code (1*7 + 1) % 16 = 8
    assert_eq!(t.data[17], ((17 * 7 + 1) % 16) as f32 * 0.25 - 1.5);
}

#[test]
fn v2_and_v3_headers() {
    for v in [2u32, 3] {
        let file = write_gguf(
            v,
            &[
                ("general.architecture", W::Str("llama")),
                ("general.alignment", W::U32(32)),
            ],
            &[tensor("a", &[4], 0, vec![0; 16])],
        );
        let tmp = temp(&file);
        let g = GgufFile::open(&tmp.0).unwrap();
        assert_eq!(g.version(), v);
        assert_eq!(g.architecture().unwrap(), "llama");
        assert_eq!(g.metadata_keys(), vec!["general.architecture", "general.alignment"]);
        assert_eq!(g.read_tensor("a").unwrap().shape, vec![4]);
    }
    let file = write_gguf(1, &[], &[]);
    let tmp = temp(&file);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.contains("unsupported GGUF version 1"), "{e}");
    assert!(e.starts_with(&tmp.0.display().to_string()), "{e}");
}

#[test]
fn bad_magic() {
    let mut file = write_gguf(3, &[], &[]);
    file[0] = b'X';
    let tmp = temp(&file);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.starts_with(&tmp.0.display().to_string()), "{e}");
    assert!(e.contains("not a GGUF file"), "{e}");
}

#[test]
fn truncated_files() {
    let file = write_gguf(
        3,
        &[
            ("general.architecture", W::Str("llama")),
            ("tokenizer.ggml.tokens", W::StrArr(vec!["a".into(); 10])),
        ],
        &[tensor("w", &[8], 0, vec![0; 32])],
    );
    // Every prefix must fail cleanly (no panic); prefixes cutting the tensor data name the tensor.
    for cut in 0..file.len() {
        let tmp = temp(&file[..cut]);
        let r = GgufFile::open(&tmp.0);
        let e = match r {
            Ok(_) => panic!("prefix of {cut} bytes opened"),
            Err(e) => e.to_string(),
        };
        assert!(e.starts_with(&tmp.0.display().to_string()), "{e}");
        assert!(!e.contains('\n'), "{e}");
    }
    let header_end = file.len() - 32;
    let tmp = temp(&file[..header_end + 16]);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.contains("tensor `w`") && e.contains("beyond the end"), "{e}");
}

#[test]
fn giant_lengths_are_errors_not_allocations() {
    // A string array claiming 2^60 entries.
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    b.extend(1u64.to_le_bytes());
    put_str(&mut b, "tokenizer.ggml.tokens");
    b.extend(9u32.to_le_bytes());
    b.extend(8u32.to_le_bytes());
    b.extend((1u64 << 60).to_le_bytes());
    let tmp = temp(&b);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.contains("only") && e.contains("remain"), "{e}");
    // A tensor count of u64::MAX.
    let mut b = Vec::new();
    b.extend(b"GGUF");
    b.extend(3u32.to_le_bytes());
    b.extend(u64::MAX.to_le_bytes());
    b.extend(0u64.to_le_bytes());
    let tmp = temp(&b);
    assert!(GgufFile::open(&tmp.0).is_err());
    // A tensor whose dims overflow.
    let file = write_gguf(3, &[], &[tensor("huge", &[u64::MAX, 3], 0, vec![0; 32])]);
    let tmp = temp(&file);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.contains("tensor `huge`"), "{e}");
}

#[test]
fn tensor_offset_beyond_eof() {
    let mut t = tensor("blk.0.attn_q.weight", &[8], 0, vec![0; 32]);
    t.offset_override = Some(1 << 20);
    let file = write_gguf(3, &[], &[t]);
    let tmp = temp(&file);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(
        e.contains("tensor `blk.0.attn_q.weight`") && e.contains("beyond the end of the file"),
        "{e}"
    );
    // Misaligned offset.
    let mut t = tensor("x", &[8], 0, vec![0; 32]);
    t.offset_override = Some(4);
    let file = write_gguf(3, &[], &[t]);
    let tmp = temp(&file);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.contains("tensor `x`") && e.contains("alignment"), "{e}");
    // Element count not a multiple of the block size.
    let file = write_gguf(3, &[], &[tensor("odd", &[48], 8, vec![0; 68])]);
    let tmp = temp(&file);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.contains("tensor `odd`") && e.contains("block size 32"), "{e}");
}

#[test]
fn unsupported_type_names_tensor() {
    let file = write_gguf(3, &[], &[tensor("blk.0.attn_q.weight", &[256], 12, vec![0; 144])]);
    let tmp = temp(&file);
    let g = GgufFile::open(&tmp.0).unwrap();
    let e = g.read_tensor("blk.0.attn_q.weight").unwrap_err().to_string();
    let want = format!(
        "{}: tensor `blk.0.attn_q.weight`: unsupported quant type Q4_K (12); supported: F32, F16, BF16, Q8_0, Q4_0, Q4_1",
        tmp.0.display()
    );
    assert_eq!(e, want);
    let e = g.read_tensor("nope").unwrap_err().to_string();
    assert!(e.contains("`nope`"), "{e}");
    // An unknown type id fails at open, naming the tensor.
    let file = write_gguf(3, &[], &[tensor("weird", &[4], 77, vec![0; 16])]);
    let tmp = temp(&file);
    let e = GgufFile::open(&tmp.0).unwrap_err().to_string();
    assert!(e.contains("tensor `weird`") && e.contains("77"), "{e}");
}

/// llama.cpp's `permute`, written directly from the numpy reshape/swapaxes.
fn permute_rows(data: &[f32], rows: usize, cols: usize, n_head: usize) -> Vec<f32> {
    let hd = rows / n_head;
    let half = hd / 2;
    // w.reshape(n_head, 2, half, cols): element [h, j, i, c] at ((h*2 + j)*half + i)*cols + c.
    // swapaxes(1, 2) -> [h, i, j, c], laid out contiguously as the output.
    let mut out = Vec::with_capacity(data.len());
    for h in 0..n_head {
        for i in 0..half {
            for j in 0..2 {
                let src = ((h * 2 + j) * half + i) * cols;
                out.extend_from_slice(&data[src..src + cols]);
            }
        }
    }
    out
}

#[test]
fn qk_unpermute() {
    // Hand-worked: 1 head, head_dim 4, 1 column. HF rows [a0 a1 b0 b1] (first half a, second half b)
    // are interleaved by the converter into [a0 b0 a1 b1].
    let hf = [10.0, 11.0, 20.0, 21.0];
    assert_eq!(permute_rows(&hf, 4, 1, 1), vec![10.0, 20.0, 11.0, 21.0]);
    assert_eq!(unpermute_rows(&[10.0, 20.0, 11.0, 21.0], 4, 1, 1).unwrap(), hf.to_vec());
    // 2 heads of dim 4, 2 columns.
    let gguf: Vec<f32> = (0..16).map(|x| x as f32).collect();
    let want = vec![
        0.0, 1.0, 4.0, 5.0, 2.0, 3.0, 6.0, 7.0, // head 0: gguf rows 0,2,1,3
        8.0, 9.0, 12.0, 13.0, 10.0, 11.0, 14.0, 15.0, // head 1: gguf rows 4,6,5,7
    ];
    assert_eq!(unpermute_rows(&gguf, 8, 2, 2).unwrap(), want);
    // inverse(forward(x)) == x and forward(inverse(x)) == x for several shapes.
    for (rows, cols, n_head) in [(8, 3, 2), (64, 5, 4), (24, 7, 3), (12, 1, 1)] {
        let x: Vec<f32> = (0..rows * cols).map(|v| v as f32 * 0.5 - 3.0).collect();
        assert_eq!(
            unpermute_rows(&permute_rows(&x, rows, cols, n_head), rows, cols, n_head).unwrap(),
            x
        );
        assert_eq!(
            permute_rows(&unpermute_rows(&x, rows, cols, n_head).unwrap(), rows, cols, n_head),
            x
        );
    }
    assert!(unpermute_rows(&[0.0; 6], 6, 1, 4).is_none());
}

fn tiny_llama(extra_kv: Vec<(&'static str, W)>) -> Vec<u8> {
    let (hidden, heads, kv_heads, ffn, vocab) = (8u64, 2u64, 1u64, 32u64, 6u64);
    let hd = hidden / heads;
    let f32s = |n: u64, base: f32| -> Vec<u8> { (0..n).flat_map(|i| (base + i as f32).to_le_bytes()).collect() };
    let mut kv = vec![
        ("general.architecture", W::Str("llama")),
        ("llama.embedding_length", W::U32(hidden as u32)),
        ("llama.feed_forward_length", W::U32(ffn as u32)),
        ("llama.block_count", W::U32(1)),
        ("llama.attention.head_count", W::U32(heads as u32)),
        ("llama.attention.head_count_kv", W::U32(kv_heads as u32)),
        ("llama.attention.layer_norm_rms_epsilon", W::F32(1e-5)),
        ("llama.context_length", W::U32(128)),
        ("tokenizer.ggml.bos_token_id", W::U32(1)),
        ("tokenizer.ggml.eos_token_id", W::U32(2)),
    ];
    kv.extend(extra_kv);
    let t = vec![
        tensor("token_embd.weight", &[hidden, vocab], 0, f32s(hidden * vocab, 0.0)),
        tensor("blk.0.attn_norm.weight", &[hidden], 0, f32s(hidden, 1.0)),
        tensor("blk.0.attn_q.weight", &[hidden, hidden], 0, f32s(hidden * hidden, 0.0)),
        tensor(
            "blk.0.attn_k.weight",
            &[hidden, kv_heads * hd],
            0,
            f32s(hidden * kv_heads * hd, 0.0),
        ),
        tensor(
            "blk.0.attn_v.weight",
            &[hidden, kv_heads * hd],
            0,
            f32s(hidden * kv_heads * hd, 0.0),
        ),
        tensor(
            "blk.0.attn_output.weight",
            &[hidden, hidden],
            0,
            f32s(hidden * hidden, 0.0),
        ),
        tensor("blk.0.ffn_gate.weight", &[hidden, ffn], 0, f32s(hidden * ffn, 0.0)),
        tensor("blk.0.ffn_up.weight", &[hidden, ffn], 0, f32s(hidden * ffn, 0.0)),
        tensor("blk.0.ffn_down.weight", &[ffn, hidden], 0, f32s(hidden * ffn, 0.0)),
        tensor("blk.0.ffn_norm.weight", &[hidden], 0, f32s(hidden, 1.0)),
        tensor("output_norm.weight", &[hidden], 0, f32s(hidden, 1.0)),
    ];
    write_gguf(3, &kv, &t)
}

#[test]
fn synthetic_llama_config_and_names() {
    let tmp = temp(&tiny_llama(vec![]));
    let g = GgufFile::open(&tmp.0).unwrap();
    let c = g.hf_config().unwrap();
    assert_eq!(c["model_type"], "llama");
    assert_eq!(c["hidden_size"], 8);
    assert_eq!(c["intermediate_size"], 32);
    assert_eq!(c["num_key_value_heads"], 1);
    assert_eq!(c["head_dim"], 4);
    assert_eq!(c["rope_theta"], 10000.0);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    assert_eq!(c["vocab_size"], 6); // from token_embd rows: no tokenizer.ggml.tokens here
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["bos_token_id"], 1);
    let names = g.hf_tensor_names();
    assert_eq!(names.first().map(String::as_str), Some("model.embed_tokens.weight"));
    assert_eq!(names.last().map(String::as_str), Some("model.norm.weight"));
    assert_eq!(names.len(), 11);
    assert!(!names.iter().any(|n| n == "lm_head.weight"));
    let k = g.hf_tensor("model.layers.0.self_attn.k_proj.weight").unwrap();
    assert_eq!(k.shape, vec![4, 8]);
    // 1 kv head, head_dim 4: HF row r comes from GGUF row [0, 2, 1, 3][r]; GGUF row g holds 8g..8g+8.
    for (r, g_row) in [0usize, 2, 1, 3].iter().enumerate() {
        assert_eq!(k.data[r * 8], (*g_row * 8) as f32);
    }
    let q = g.hf_tensor("model.layers.0.self_attn.q_proj.weight").unwrap();
    assert_eq!(q.shape, vec![8, 8]);
    for (r, g_row) in [0usize, 2, 1, 3, 4, 6, 5, 7].iter().enumerate() {
        assert_eq!(q.data[r * 8], (*g_row * 8) as f32);
    }
    let down = g.hf_tensor("model.layers.0.mlp.down_proj.weight").unwrap();
    assert_eq!(down.shape, vec![8, 32]);
    let e = g.hf_tensor("lm_head.weight").unwrap_err().to_string();
    assert!(
        e.contains("lm_head.weight") && e.starts_with(&tmp.0.display().to_string()),
        "{e}"
    );
    let e = g.hf_tensor("model.layers.0.foo.weight").unwrap_err().to_string();
    assert!(e.contains("model.layers.0.foo.weight"), "{e}");
    // A missing required key is named.
    let e = g.tokenizer().unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.model"), "{e}");
}

#[test]
fn non_llama_and_spm_are_errors() {
    let file = write_gguf(
        3,
        &[
            ("general.architecture", W::Str("phi3")),
            ("tokenizer.ggml.model", W::Str("llama")),
        ],
        &[],
    );
    let tmp = temp(&file);
    let g = GgufFile::open(&tmp.0).unwrap();
    let e = g.hf_config().unwrap_err().to_string();
    assert!(e.contains("general.architecture") && e.contains("phi3"), "{e}");
    let e = g.tokenizer().unwrap_err().to_string();
    assert!(e.contains("tokenizer.ggml.model") && e.contains("'llama'"), "{e}");
}

#[test]
fn synthetic_bpe_tokenizer() {
    // Byte-level BPE over a tiny vocabulary: every byte of "ab 12<|x|>" plus a few merges.
    let mut tokens: Vec<String> = vec![
        "<|x|>".into(),
        "a".into(),
        "b".into(),
        "Ġ".into(),
        "1".into(),
        "2".into(),
    ];
    tokens.extend(["ab", "Ġa", "Ġab", "12"].map(String::from));
    // Ranks: "Ġ a" before "a b", so " ab" becomes "Ġa" + "b" -> "Ġab" rather than "Ġ" + "ab".
    let merges = vec!["Ġ a".to_string(), "Ġa b".into(), "a b".into(), "1 2".into()];
    let mut types = vec![1; tokens.len()];
    types[0] = 3;
    let file = write_gguf(
        3,
        &[
            ("general.architecture", W::Str("llama")),
            ("tokenizer.ggml.model", W::Str("gpt2")),
            ("tokenizer.ggml.pre", W::Str("smollm")),
            ("tokenizer.ggml.tokens", W::StrArr(tokens)),
            ("tokenizer.ggml.merges", W::StrArr(merges)),
            ("tokenizer.ggml.token_type", W::I32Arr(types)),
            ("tokenizer.ggml.bos_token_id", W::U32(0)),
            ("tokenizer.ggml.add_bos_token", W::Bool(true)),
        ],
        &[],
    );
    let tmp = temp(&file);
    let g = GgufFile::open(&tmp.0).unwrap();
    let tok = g.tokenizer().unwrap();
    let enc = tok.encode("ab ab12<|x|>", false).unwrap();
    // "12" is split into single digits by the smollm pre-tokenizer, so the "1 2" merge never applies.
    assert_eq!(enc.get_ids(), &[6, 8, 4, 5, 0]);
    let enc = tok.encode("ab", true).unwrap();
    assert_eq!(enc.get_ids(), &[0, 6]);
    assert_eq!(tok.decode(&[6, 8, 0], true).unwrap(), "ab ab");
    assert_eq!(tok.decode(&[6, 8, 0], false).unwrap(), "ab ab<|x|>");
}

#[test]
fn corrupted_bytes_never_panic() {
    let file = tiny_llama(vec![
        ("tokenizer.ggml.model", W::Str("gpt2")),
        (
            "tokenizer.ggml.tokens",
            W::StrArr(vec!["a".into(), "b".into(), "ab".into()]),
        ),
        ("tokenizer.ggml.merges", W::StrArr(vec!["a b".into()])),
        ("tokenizer.ggml.token_type", W::I32Arr(vec![1, 1, 1])),
    ]);
    // Deterministic pseudo-random corruption of 1 to 4 bytes in the header region, 400 times.
    let header_len = file.len().min(2048);
    let mut state = 0x9e37_79b9_7f4a_7c15u64;
    let mut next = move || {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        state
    };
    for _ in 0..400 {
        let mut f = file.clone();
        for _ in 0..(next() % 4 + 1) {
            let at = (next() % header_len as u64) as usize;
            f[at] = match next() % 3 {
                0 => 0xff,
                1 => 0,
                _ => next() as u8,
            };
        }
        let tmp = temp(&f);
        if let Ok(g) = GgufFile::open(&tmp.0) {
            for name in g.tensor_names() {
                let _ = g.read_tensor(name);
            }
            for name in g.hf_tensor_names() {
                let _ = g.hf_tensor(&name);
            }
            let _ = g.hf_config();
            let _ = g.tokenizer();
        }
    }
}

// ---- the real SmolLM2 file ----------------------------------------------------------------------------

fn smollm2_path() -> Option<PathBuf> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("models/smollm2/SmolLM2-135M-Instruct.Q4_1.gguf");
    if p.exists() {
        Some(p)
    } else {
        eprintln!("skipping: {} is absent (run scripts/fetch_smollm2.sh)", p.display());
        None
    }
}

#[test]
fn smollm2_real_file() {
    let Some(path) = smollm2_path() else { return };
    let g = GgufFile::open(&path).unwrap();
    assert_eq!(g.version(), 3);
    assert_eq!(g.architecture().unwrap(), "llama");
    let c = g.hf_config().unwrap();
    assert_eq!(c["hidden_size"], 576);
    assert_eq!(c["intermediate_size"], 1536);
    assert_eq!(c["num_hidden_layers"], 30);
    assert_eq!(c["num_attention_heads"], 9);
    assert_eq!(c["num_key_value_heads"], 3);
    assert_eq!(c["vocab_size"], 49152);
    assert_eq!(c["head_dim"], 64);
    assert_eq!(c["tie_word_embeddings"], true);
    assert_eq!(c["rope_theta"], 100000.0);
    assert_eq!(c["rms_norm_eps"], 1e-5);
    let names = g.hf_tensor_names();
    assert_eq!(names.len(), 1 + 30 * 9 + 1);
    for name in &names {
        let t = g.hf_tensor(name).unwrap();
        let want: Vec<usize> = if name == "model.embed_tokens.weight" {
            vec![49152, 576]
        } else if name == "model.norm.weight" || name.ends_with("layernorm.weight") {
            vec![576]
        } else if name.ends_with("q_proj.weight") || name.ends_with("o_proj.weight") {
            vec![576, 576]
        } else if name.ends_with("k_proj.weight") || name.ends_with("v_proj.weight") {
            vec![192, 576]
        } else if name.ends_with("gate_proj.weight") || name.ends_with("up_proj.weight") {
            vec![1536, 576]
        } else if name.ends_with("down_proj.weight") {
            vec![576, 1536]
        } else {
            panic!("unexpected {name}")
        };
        assert_eq!(t.shape, want, "{name}");
        assert_eq!(t.data.len(), t.numel(), "{name}");
        assert!(t.data.iter().all(|x| x.is_finite()), "{name}");
    }
    let tok = g.tokenizer().unwrap();
    let enc = tok.encode("The capital of France is", false).unwrap();
    eprintln!("'The capital of France is' -> {:?}", enc.get_ids());
    assert_eq!(enc.get_ids(), &[504, 3575, 282, 4649, 314]);
    let ids = tok.encode("Hello world! 123", false).unwrap();
    assert_eq!(ids.get_ids(), &[19556, 905, 17, 216, 33, 34, 35]);
    assert_eq!(tok.decode(&[1, 504, 3575, 2], true).unwrap(), "The capital");
}

/// Compare the GGUF tokenizer with a reference tokenization: `DEJAVU_TOKENIZER_REF` names a JSONL file of
/// {"file","line","field","text","ids"} lines written by scripts/check_gguf_tokenizer.py.
#[test]
fn smollm2_tokenizer_matches_reference() {
    let Some(path) = smollm2_path() else { return };
    let Some(ref_path) = std::env::var_os("DEJAVU_TOKENIZER_REF")
        .map(PathBuf::from)
        .filter(|p| p.exists())
    else {
        eprintln!("skipping: set DEJAVU_TOKENIZER_REF to an ids file from scripts/check_gguf_tokenizer.py");
        return;
    };
    let tok = GgufFile::open(&path).unwrap().tokenizer().unwrap();
    let text = std::fs::read_to_string(&ref_path).unwrap();
    let (mut compared, mut mismatches) = (0usize, 0usize);
    let mut first: Option<String> = None;
    for (n, line) in text.lines().enumerate() {
        if line.trim().is_empty() {
            continue;
        }
        let rec: Json =
            serde_json::from_str(line).unwrap_or_else(|e| panic!("{}:{}: {e}", ref_path.display(), n + 1));
        let s = rec["text"].as_str().unwrap();
        let want: Vec<u32> = rec["ids"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as u32)
            .collect();
        let got = tok.encode(s, false).unwrap();
        compared += 1;
        if got.get_ids() != want.as_slice() {
            mismatches += 1;
            if first.is_none() {
                first = Some(format!(
                    "{} line {} field {}: text {:?}\n  reference {:?}\n  gguf      {:?}",
                    rec["file"],
                    rec["line"],
                    rec["field"],
                    s,
                    want,
                    got.get_ids()
                ));
            }
        }
    }
    eprintln!("tokenizer check: {compared} strings compared, {mismatches} mismatches");
    assert!(compared > 0, "no strings in {}", ref_path.display());
    assert_eq!(mismatches, 0, "first mismatch: {}", first.unwrap_or_default());
}
