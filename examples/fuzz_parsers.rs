//! Mutation fuzzing of dejavu's file parsers: safetensors, GGUF, config.json, tokenizer.json, task files (and task
//! definitions) and recipes.
//!
//!   cargo run --release --example fuzz_parsers -- TARGET SECONDS [CRASH_DIR]
//!   scripts/fuzz.sh [MINUTES_PER_TARGET]          # every target, with a memory limit and restarts after an abort
//!
//! Each iteration takes a seed file (real files from the fixtures, stories260k, ../shared task files, and a small
//! GGUF written here), applies 1-8 random mutations (bit flips, "interesting" integers over length fields, inserted
//! JSON tokens, deleted / duplicated / truncated ranges, splices of two seeds), writes it to disk and runs the
//! parser and what a command would do next with the result (read every tensor, build the tokenizer, encode text),
//! under `catch_unwind`. A panic is a bug: its input is saved under CRASH_DIR with the panic's location and
//! message. A process abort (e.g. an allocation the memory limit refuses) leaves the input in CRASH_DIR/current-*,
//! which scripts/fuzz.sh keeps. Errors (`Err`) are the expected outcome for most inputs and are only counted.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use dejavu::source::checkpoint::{Checkpoint, GgufCheckpoint, SafetensorsCheckpoint};

struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: usize) -> usize {
        if n == 0 {
            0
        } else {
            (self.next() % n as u64) as usize
        }
    }
}

const INTERESTING: &[u64] = &[
    0, 1, 2, 7, 8, 16, 31, 32, 63, 64, 127, 128, 255, 256, 1023, 1024, 4095, 4096, 65535, 65536, 0x7fff_ffff, 0x8000_0000,
    0xffff_ffff, 0x1_0000_0000, 0x7fff_ffff_ffff_ffff, 0x8000_0000_0000_0000, u64::MAX, u64::MAX - 1,
];

const JSON_TOKENS: &[&str] = &[
    "\"", "{", "}", "[", "]", ",", ":", "null", "true", "-1", "0", "1e999", "-1e999", "NaN", "18446744073709551616",
    "4294967296", "2147483648", "1.5", "\"\"", "\\u0000", "\\ud800", "[]", "{}", "\"dtype\"", "\"F16\"", "\"shape\"",
    "\"data_offsets\"", "\"num_hidden_layers\"", "\"hidden_size\"", "\"model_type\"", "\"llama\"", "\"opt\"",
    "\"choices\"", "\"gold\"", "\"query\"", "\"sentence\"", "\"option1\"", "\"answer\"", "\"text\"", "\"vocab\"",
    "\"merges\"", "\"type\"", "\"BPE\"", "\"added_tokens\"", "\"id\"", "\n", "\u{fffd}", "é", "\u{0}",
];

fn mutate(rng: &mut Rng, seeds: &[Vec<u8>], text_like: bool) -> Vec<u8> {
    let mut v = seeds[rng.below(seeds.len())].clone();
    let ops = 1 + rng.below(8);
    for _ in 0..ops {
        let n = v.len();
        match rng.below(if text_like { 9 } else { 8 }) {
            0 if n > 0 => {
                let i = rng.below(n);
                v[i] ^= 1 << rng.below(8);
            }
            1 if n > 0 => {
                let i = rng.below(n);
                v[i] = [0u8, 0xff, 0x7f, 0x80, b'0', b'9', b'"', b'-'][rng.below(8)];
            }
            2 if n >= 8 => {
                // An interesting integer over a 4- or 8-byte field (length and count fields of binary formats).
                let x = INTERESTING[rng.below(INTERESTING.len())];
                let w = if rng.below(2) == 0 { 4 } else { 8 };
                let i = rng.below(n - w + 1);
                v[i..i + w].copy_from_slice(&x.to_le_bytes()[..w]);
            }
            3 if n > 0 => {
                let i = rng.below(n);
                let len = 1 + rng.below((n - i).min(256));
                v.drain(i..i + len);
            }
            4 if n > 0 => {
                let i = rng.below(n);
                let len = 1 + rng.below((n - i).min(256));
                let chunk = v[i..i + len].to_vec();
                let at = rng.below(n + 1);
                v.splice(at..at, chunk);
            }
            5 => {
                let cut = rng.below(n + 1);
                v.truncate(cut);
            }
            6 => {
                let other = &seeds[rng.below(seeds.len())];
                if !other.is_empty() {
                    let a = rng.below(n + 1);
                    let b = rng.below(other.len());
                    v.truncate(a);
                    v.extend_from_slice(&other[b..]);
                }
            }
            7 => {
                let at = rng.below(n + 1);
                let len = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..len).map(|_| rng.next() as u8).collect();
                v.splice(at..at, bytes);
            }
            _ => {
                let t = JSON_TOKENS[rng.below(JSON_TOKENS.len())].as_bytes();
                let at = rng.below(n + 1);
                if rng.below(2) == 0 || n == 0 {
                    v.splice(at..at, t.iter().copied());
                } else {
                    let end = (at + t.len()).min(n);
                    v.splice(at..end, t.iter().copied());
                }
            }
        }
    }
    v
}

/// A small GGUF v3 Llama file with tokenizer metadata and every tensor of one layer, as dejavu's loader reads it.
fn gguf_seed(types: &[(u32, usize)]) -> Vec<u8> {
    fn s(out: &mut Vec<u8>, v: &str) {
        out.extend((v.len() as u64).to_le_bytes());
        out.extend(v.as_bytes());
    }
    let (d, f, vocab) = (32u64, 64u64, 8u64);
    let tensors: Vec<(&str, Vec<u64>)> = vec![
        ("token_embd.weight", vec![d, vocab]),
        ("blk.0.attn_norm.weight", vec![d]),
        ("blk.0.attn_q.weight", vec![d, d]),
        ("blk.0.attn_k.weight", vec![d, d]),
        ("blk.0.attn_v.weight", vec![d, d]),
        ("blk.0.attn_output.weight", vec![d, d]),
        ("blk.0.ffn_norm.weight", vec![d]),
        ("blk.0.ffn_gate.weight", vec![d, f]),
        ("blk.0.ffn_up.weight", vec![d, f]),
        ("blk.0.ffn_down.weight", vec![f, d]),
        ("output_norm.weight", vec![d]),
    ];
    let tokens = ["<unk>", "<s>", "</s>", "a", "b", "ab", "Ġa", "Ġb"];
    let mut out = Vec::new();
    out.extend(b"GGUF");
    out.extend(3u32.to_le_bytes());
    out.extend((tensors.len() as u64).to_le_bytes());
    let kv_u32: &[(&str, u32)] = &[
        ("llama.embedding_length", d as u32),
        ("llama.feed_forward_length", f as u32),
        ("llama.block_count", 1),
        ("llama.attention.head_count", 4),
        ("llama.attention.head_count_kv", 2),
        ("llama.context_length", 64),
        ("tokenizer.ggml.bos_token_id", 1),
        ("tokenizer.ggml.eos_token_id", 2),
    ];
    out.extend((kv_u32.len() as u64 + 6).to_le_bytes());
    s(&mut out, "general.architecture");
    out.extend(8u32.to_le_bytes());
    s(&mut out, "llama");
    for (k, v) in kv_u32 {
        s(&mut out, k);
        out.extend(4u32.to_le_bytes());
        out.extend(v.to_le_bytes());
    }
    s(&mut out, "llama.attention.layer_norm_rms_epsilon");
    out.extend(6u32.to_le_bytes());
    out.extend(1e-5f32.to_le_bytes());
    s(&mut out, "llama.rope.freq_base");
    out.extend(6u32.to_le_bytes());
    out.extend(10000f32.to_le_bytes());
    s(&mut out, "tokenizer.ggml.model");
    out.extend(8u32.to_le_bytes());
    s(&mut out, "gpt2");
    s(&mut out, "tokenizer.ggml.tokens");
    out.extend(9u32.to_le_bytes()); // array
    out.extend(8u32.to_le_bytes()); // of strings
    out.extend((tokens.len() as u64).to_le_bytes());
    for t in tokens {
        s(&mut out, t);
    }
    s(&mut out, "tokenizer.ggml.merges");
    out.extend(9u32.to_le_bytes());
    out.extend(8u32.to_le_bytes());
    out.extend(1u64.to_le_bytes());
    s(&mut out, "a b");
    let mut offset = 0u64;
    let mut blobs = Vec::new();
    for (i, (name, dims)) in tensors.iter().enumerate() {
        let (ty, bytes_per_32) = types[i % types.len()];
        let elems: u64 = dims.iter().product();
        let size = (elems as usize).div_ceil(32) * bytes_per_32;
        s(&mut out, name);
        out.extend((dims.len() as u32).to_le_bytes());
        for x in dims {
            out.extend(x.to_le_bytes());
        }
        out.extend(ty.to_le_bytes());
        out.extend(offset.to_le_bytes());
        let blob: Vec<u8> = (0..size).map(|j| ((j * 131 + i * 17) % 251) as u8 & 0x3f).collect();
        offset += (size as u64).div_ceil(32) * 32;
        blobs.push(blob);
    }
    while out.len() % 32 != 0 {
        out.push(0);
    }
    for b in blobs {
        out.extend(&b);
        while out.len() % 32 != 0 {
            out.push(0);
        }
    }
    out
}

fn read(path: &Path) -> Vec<u8> {
    std::fs::read(path).unwrap_or_else(|e| panic!("seed {}: {e}", path.display()))
}

fn shared() -> PathBuf {
    std::env::var_os("DEJAVU_SHARED").map(PathBuf::from).unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../shared"))
}

fn fixtures(file: &str) -> Vec<Vec<u8>> {
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures");
    let mut out: Vec<Vec<u8>> = ["tiny-llama", "tiny-llama-tied", "tiny-opt", "tiny-opt-proj"].iter().map(|m| read(&root.join(m).join(file))).collect();
    let s260 = shared().join("models/stories260k").join(file);
    if s260.is_file() {
        out.push(read(&s260));
    }
    out
}

/// Run what a command does with a parsed file. `Err` results are fine; a panic is the bug being looked for.
fn exercise(target: &str, path: &Path, dir: &Path) -> Result<(), String> {
    let e = |x: dejavu::error::Error| x.to_string();
    match target {
        "safetensors" => {
            let ck = SafetensorsCheckpoint::open_file(path).map_err(e)?;
            for n in ck.names() {
                let _ = ck.meta(&n);
                if let Ok(raw) = ck.raw(&n) {
                    std::hint::black_box(raw.bytes.len());
                }
                let _ = ck.get(&n);
            }
            Ok(())
        }
        "gguf" => {
            let ck = GgufCheckpoint::open(path).map_err(e)?;
            let _ = ck.file.hf_config();
            if let Ok(tok) = ck.file.tokenizer() {
                if let Ok(enc) = tok.encode("ab a b", false) {
                    let _ = tok.decode(enc.get_ids(), false);
                }
            }
            for n in ck.names() {
                let _ = ck.meta(&n);
                let _ = ck.get(&n);
            }
            Ok(())
        }
        "config" => {
            let c = dejavu::config::ModelConfig::from_file(path).map_err(e)?;
            std::hint::black_box((c.param_count(), c.position_limit()));
            Ok(())
        }
        "tokenizer" => {
            let tok = dejavu::source::load_tokenizer_json(path).map_err(e)?;
            let enc = tok.encode("Once upon a time, é \u{1F600} 12345", false).map_err(|x| x.to_string())?;
            let _ = tok.decode(enc.get_ids(), false);
            Ok(())
        }
        t if t.starts_with("tasks-") => {
            // A built-in name resolves to its file in `dir`; `taskdef` is an unknown task described by a TOML
            // definition beside its JSONL file.
            let name = &t["tasks-".len()..];
            let spec = dejavu::eval::tasks::find(name, dir).map_err(e)?;
            let task = dejavu::eval::tasks::read(&spec, None, None).map_err(e)?;
            std::hint::black_box(task.examples.len());
            Ok(())
        }
        "recipe" => {
            let r = dejavu::recipe::Recipe::load(path, &[], false, None).map_err(e)?;
            for stage in r.stages.clone() {
                let _ = r.stage_args(&stage);
            }
            // With --full too: the [full] table's overrides applied (an error where the recipe has none).
            if let Ok(r) = dejavu::recipe::Recipe::load(path, &[], true, Some(dir)) {
                for stage in r.stages.clone() {
                    let _ = r.stage_args(&stage);
                }
            }
            Ok(())
        }
        other => Err(format!("unknown target {other}")),
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        eprintln!("usage: fuzz_parsers TARGET SECONDS [CRASH_DIR]\n  targets: safetensors gguf config tokenizer recipe tasks-taskdef tasks-<copa|piqa|winogrande|hellaswag|lambada_openai|arc_easy|boolq|openbook_qa>");
        std::process::exit(2);
    }
    let target = args[1].clone();
    let seconds: u64 = args[2].parse().unwrap_or_else(|_| {
        eprintln!("SECONDS must be a whole number");
        std::process::exit(2)
    });
    let crash_dir = PathBuf::from(args.get(3).cloned().unwrap_or_else(|| "target/fuzz-crashes".into()));
    std::fs::create_dir_all(&crash_dir).expect("creating the crash directory");

    let (seeds, file_name, text_like): (Vec<Vec<u8>>, String, bool) = match target.as_str() {
        "safetensors" => (fixtures("model.safetensors"), "model.safetensors".into(), false),
        // Q8_0 (34 bytes per 32), Q4_1 (20), F16 (64), F32 (128) and Q4_0 (18) tensors.
        "gguf" => (vec![gguf_seed(&[(8, 34), (3, 20), (1, 64), (0, 128), (2, 18)]), gguf_seed(&[(1, 64)])], "model.gguf".into(), false),
        "config" => (fixtures("config.json"), "config.json".into(), true),
        "tokenizer" => (fixtures("tokenizer.json"), "tokenizer.json".into(), true),
        "tasks-taskdef" => {
            // The TOML definition of a task the tool does not know, beside a copy of its JSONL file.
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/tasks");
            let dir = crash_dir.join("current-tasks-taskdef");
            std::fs::create_dir_all(&dir).expect("creating the work directory");
            std::fs::copy(root.join("arc_mini.jsonl"), dir.join("taskdef.jsonl")).expect("the test task file");
            (vec![read(&root.join("arc_mini.toml"))], "taskdef.toml".into(), true)
        }
        t if t.starts_with("tasks-") => {
            let name = &t["tasks-".len()..];
            let spec = dejavu::eval::tasks::spec(name).unwrap_or_else(|e| {
                eprintln!("{e}");
                std::process::exit(2)
            });
            let text = std::fs::read_to_string(shared().join("data/tasks").join(spec.file)).expect("the shared task file");
            let head: String = text.lines().take(12).map(|l| format!("{l}\n")).collect();
            (vec![head.into_bytes()], spec.file.to_string(), true)
        }
        "recipe" => {
            let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("recipes");
            let mut seeds = Vec::new();
            for e in std::fs::read_dir(&root).expect("recipes/").flatten() {
                if e.path().extension().is_some_and(|x| x == "toml") {
                    seeds.push(read(&e.path()));
                }
            }
            (seeds, "recipe.toml".into(), true)
        }
        other => {
            eprintln!("unknown target `{other}`");
            std::process::exit(2)
        }
    };

    // The file under test lives in its own directory; after an abort it is the crash input.
    let work = crash_dir.join(format!("current-{target}"));
    std::fs::create_dir_all(&work).expect("creating the work directory");
    let path = work.join(&file_name);

    let last_panic: Arc<Mutex<Option<String>>> = Arc::new(Mutex::new(None));
    let lp = last_panic.clone();
    std::panic::set_hook(Box::new(move |info| {
        let loc = info.location().map(|l| format!("{}:{}", l.file(), l.line())).unwrap_or_default();
        let msg = info.payload().downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| info.payload().downcast_ref::<String>().cloned()).unwrap_or_default();
        if let Ok(mut g) = lp.lock() {
            *g = Some(format!("{loc}: {msg}"));
        }
    }));

    let seed = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos() as u64).unwrap_or(1) | 1;
    let mut rng = Rng(seed);
    let deadline = Instant::now() + Duration::from_secs(seconds);
    let (mut iters, mut ok, mut err) = (0u64, 0u64, 0u64);
    let mut panics: BTreeMap<String, u64> = BTreeMap::new();
    // The unmutated seeds first: they must parse.
    for (i, s) in seeds.iter().enumerate() {
        std::fs::write(&path, s).expect("writing the input");
        if let Err(e) = exercise(&target, &path, &work) {
            eprintln!("seed {i} of {target} does not parse: {e}");
            std::process::exit(1);
        }
    }
    while Instant::now() < deadline {
        let input = mutate(&mut rng, &seeds, text_like);
        std::fs::write(&path, &input).expect("writing the input");
        iters += 1;
        match std::panic::catch_unwind(|| exercise(&target, &path, &work)) {
            Ok(Ok(())) => ok += 1,
            Ok(Err(_)) => err += 1,
            Err(_) => {
                let what = last_panic.lock().ok().and_then(|mut g| g.take()).unwrap_or_else(|| "unknown panic".into());
                let c = panics.entry(what.clone()).or_insert(0);
                *c += 1;
                if *c <= 3 {
                    let n = panics.values().sum::<u64>();
                    let f = crash_dir.join(format!("{target}-panic-{n}.bin"));
                    let _ = std::fs::write(&f, &input);
                    let _ = std::fs::write(f.with_extension("txt"), format!("{what}\n"));
                }
            }
        }
    }
    let _ = std::fs::remove_file(&path);
    println!(
        "{target}: {iters} inputs in {seconds} s ({:.0}/s): {ok} parsed, {err} refused with an error, {} panicked ({} distinct)",
        iters as f64 / seconds.max(1) as f64,
        panics.values().sum::<u64>(),
        panics.len()
    );
    for (what, n) in &panics {
        println!("  panic x{n}: {what}");
    }
    if !panics.is_empty() {
        std::process::exit(1);
    }
}
