//! `dejavu bench`: decode latency of the CUDA engine, at a named real shape with random weights or on a model's
//! own weights, against the weight-read floor measured in the same process.

use std::path::PathBuf;

use anyhow::Context;

use dejavu::bench::{shape_names, table, BenchResult, BlockRule, Shape};
use dejavu::source::weights::Half;

use super::{out, usage};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    /// A model (its own weights): Hugging Face directory, GGUF file or Hub id.
    #[arg(long, short = 'm', conflicts_with = "shape", required_unless_present_any = ["shape", "list_shapes"])]
    pub model: Option<String>,
    /// Named real shapes with random weights (latency does not depend on the values); several may be given.
    /// `--list-shapes` prints them.
    #[arg(long, num_args = 1..)]
    pub shape: Vec<String>,
    /// Weight type (default f16 for shapes; for a model, bf16 if its checkpoint is bf16, else f16).
    #[arg(long, value_enum)]
    pub dtype: Option<Half>,
    /// Rows decoded together (weights are read once per step for all of them).
    #[arg(long, num_args = 1.., default_values_t = [1usize])]
    pub batch: Vec<usize>,
    /// Prompt tokens per row (random ids), prefilled before decoding.
    #[arg(long, default_value_t = 128)]
    pub prompt: usize,
    /// Decode steps timed (greedy; each step's argmax feeds the next on the device).
    #[arg(long, default_value_t = 128)]
    pub tokens: usize,
    /// Untimed full runs (prefill + decode) before the timed one.
    #[arg(long, default_value_t = 2)]
    pub warmup: usize,
    /// Also time one un-captured step per kernel class (embed, norm, qkv, attention, out_proj, mlp, lm_head).
    #[arg(long)]
    pub breakdown: bool,
    /// Write the results as JSON.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// Write the results as CSV.
    #[arg(long)]
    pub csv: Option<PathBuf>,
    /// Print the known shapes and exit.
    #[arg(long)]
    pub list_shapes: bool,
    /// Time one MLP block instead of decode: the sparse block (kept neurons' rows gathered, down from its
    /// transposed copy) at each `--keep` fraction beside our dense block, one CUDA-graph replay per timing with the
    /// L2 flushed first (as PERF.md times Deja Vu's and TEAL's kernels). Needs `--shape`.
    #[arg(long, requires = "shape")]
    pub mlp_block: bool,
    /// Kept fractions of the MLP's neurons for `--mlp-block` (0 < k <= 1).
    #[arg(long, num_args = 1.., default_values_t = [0.5, 0.25, 0.1])]
    pub keep: Vec<f64>,
    /// What the sparse `--mlp-block` runs: `gather` (kept ids given, no selection), or a rule with its selection
    /// on the GPU timed in the block: `exactdown` (dense gate/up, top-k; SwiGLU), `qscore` (int4 score pass,
    /// top-k; random score copies; SwiGLU) or `dejavu` (a random low-rank predictor, top-k; any family).
    #[arg(long, value_enum, default_value_t = BlockRule::Gather)]
    #[serde(default)]
    pub rule: BlockRule,
    /// Decode under a sparse mode on random weights (`--shape`): `dejavu@S` (a random predictor of the rank
    /// `train-predictors` picks, included in the time), and on Llama shapes `qscore@S` (random int4 score copies)
    /// or `exactdown@S`; the floor counts the bytes the plan reads at batch 1.
    #[arg(long, value_name = "MODE")]
    #[serde(default)]
    pub mode: Option<dejavu::sparse::Mode>,
    /// Rank of the random predictors of `--mode dejavu@S`, `--head-sparsity` and `--rule dejavu` (default: what
    /// `train-predictors` picks for the width, d/4 up to 1024; the predictors' bytes are in the time and the floor).
    #[arg(long, value_name = "R")]
    #[serde(default)]
    pub rank: Option<usize>,
    /// With `--mode dejavu@S`: what the random MLP predictors read, `mlp` (the MLP's input, after the attention),
    /// `block` (the layer's input: the selection runs on a side stream beside the attention) or `prev` (the
    /// previous layer's input: the selection runs a layer ahead); see `train-predictors --neuron-input`.
    #[arg(long, value_enum, value_name = "INPUT", default_value = "mlp", requires = "mode")]
    #[serde(default)]
    pub neuron_input: dejavu::predictor::NeuronInput,
    /// With `--mode`: this fraction of heads dropped by random look-ahead head predictors.
    #[arg(long, value_name = "H", requires = "mode")]
    #[serde(default)]
    pub head_sparsity: Option<f64>,
    /// With `--head-sparsity`: `all` computes every key/value head, `kept` skips those of the dropped heads (see
    /// `generate --help`).
    #[arg(long, value_enum, value_name = "KV", default_value_t = dejavu::sparse::HeadKv::All, requires = "head_sparsity")]
    #[serde(default)]
    pub head_kv: dejavu::sparse::HeadKv,
    /// Timed replays per `--mlp-block` row and per `--kernels` prefix (the median and p90 are reported).
    #[arg(long, default_value_t = 100)]
    pub reps: usize,
    /// Also print where one captured decode step's time goes, kernel by kernel: the step is captured again with
    /// only its first n launches for every n, each graph replayed `--reps` times with the L2 flushed first, and a
    /// kernel's time is the growth of the median when it is added (so what PDL or the side stream hides does not
    /// count). The shape's layers are cut to `--kernel-layers` for it and the whole run. Needs `--shape`.
    #[arg(long, requires = "shape")]
    #[serde(default)]
    pub kernels: bool,
    /// Layers of the shape under `--kernels`.
    #[arg(long, default_value_t = 4, value_name = "N")]
    #[serde(default)]
    pub kernel_layers: usize,
    /// Time what one launch boundary costs our one-row GEMV apart from its bytes, instead of decode: at the shape's
    /// out- and down-projection, one launch over `--chain` x d rows against a chain of `--chain` launches of d rows
    /// (the same bytes; one CUDA graph each, `--reps` replays, the L2 flushed first), and the same slices in one
    /// launch separated by grid barriers. Needs `--shape`.
    #[arg(long, requires = "shape")]
    #[serde(default)]
    pub launch_cost: bool,
    /// Launches in the `--launch-cost` chain (a decode step has one a layer of each matrix).
    #[arg(long, default_value_t = 32, value_name = "C")]
    #[serde(default)]
    pub chain: usize,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    if args.list_shapes {
        let mut s = String::from("| shape | family | d | ffn | layers | heads (kv) | vocab | params |\n|---|---|---|---|---|---|---|---|\n");
        for sh in dejavu::bench::SHAPES {
            let p = dejavu::source::names::Table::standard(&sh.config()).params() as f64 / 1e9;
            s += &format!("| {} | {:?} | {} | {} | {} | {} ({}) | {} | {:.2}B |\n", sh.name, sh.family, sh.hidden, sh.ffn, sh.layers, sh.heads, sh.kv_heads, sh.vocab, p);
        }
        return out(&s);
    }
    let shapes: Vec<Shape> = args
        .shape
        .iter()
        .map(|n| Shape::find(n).ok_or_else(|| usage(format!("--shape {n}: unknown shape (known: {})", shape_names().join(", ")))))
        .collect::<anyhow::Result<_>>()?;
    if args.batch.iter().any(|&b| b == 0 || b > 16) {
        return Err(usage(format!("--batch must be in 1..=16 (got {:?})", args.batch)));
    }
    if args.tokens == 0 || args.prompt == 0 {
        return Err(usage("--prompt and --tokens must be at least 1"));
    }
    if let Some(m) = args.mode {
        use dejavu::sparse::Mode;
        if args.model.is_some() || args.mlp_block {
            return Err(usage("--mode: sparse decode is timed on --shape (random weights and predictors), without --model or --mlp-block"));
        }
        let llama_only = matches!(m, Mode::QScore(..) | Mode::ExactDown(..));
        if !matches!(m, Mode::Dense | Mode::Dejavu(_) | Mode::QScore(..) | Mode::ExactDown(..)) {
            return Err(usage(format!("--mode {m}: bench runs dense, dejavu@S, qscore@S and exactdown@S on random weights (cats@S needs calibrated thresholds: time it with --model)")));
        }
        if let Some(sh) = shapes.iter().find(|sh| llama_only && sh.family != dejavu::config::Family::Llama) {
            return Err(usage(format!("--mode {m}: a SwiGLU rule; --shape {} is an OPT (ReLU) shape", sh.name)));
        }
        if args.rank == Some(0) {
            return Err(usage("--rank must be at least 1"));
        }
        if m == Mode::Dejavu(None) {
            return Err(usage("--mode dejavu: give the sparsity (dejavu@S): random predictors have no trained k"));
        }
        if let Some(h) = args.head_sparsity.filter(|h| !(0.0..1.0).contains(h)) {
            return Err(usage(format!("--head-sparsity {h}: not in [0, 1)")));
        }
    }
    if args.kernels && args.mlp_block {
        return Err(usage("--kernels profiles the decode step; time one MLP block with --mlp-block alone"));
    }
    if args.kernels && (args.kernel_layers == 0 || args.reps == 0) {
        return Err(usage("--kernels needs --kernel-layers and --reps of at least 1"));
    }
    if args.launch_cost {
        if args.kernels || args.mlp_block || args.mode.is_some() || args.model.is_some() {
            return Err(usage("--launch-cost times one GEMV shape on --shape alone (without --kernels, --mlp-block, --mode or --model)"));
        }
        if args.chain < 2 || args.reps == 0 {
            return Err(usage("--launch-cost needs --chain of at least 2 and --reps of at least 1"));
        }
        if args.csv.is_some() {
            return Err(usage("--launch-cost writes --json, not --csv"));
        }
        return launch_cost(&args, &shapes);
    }
    if args.mlp_block {
        if let Some(k) = args.keep.iter().find(|k| !(**k > 0.0 && **k <= 1.0)) {
            return Err(usage(format!("--keep {k}: a kept fraction must be in (0, 1]")));
        }
        if args.reps == 0 {
            return Err(usage("--reps must be at least 1"));
        }
        let swiglu_only = matches!(args.rule, BlockRule::Exactdown | BlockRule::Qscore);
        if let Some(sh) = shapes.iter().find(|sh| swiglu_only && sh.family != dejavu::config::Family::Llama) {
            return Err(usage(format!("--rule {}: a SwiGLU rule; --shape {} is an OPT (ReLU) shape", args.rule.name(), sh.name)));
        }
        let results = measure_mlp(&args, &shapes)?;
        out(&dejavu::bench::mlp_table(&results))?;
        if let Some(p) = &args.json {
            dejavu::store::write_json(p, &results).with_context(|| format!("while writing {}", p.display()))?;
        }
        if let Some(p) = &args.csv {
            let bytes = dejavu::bench::mlp_csv(&results)?;
            dejavu::store::write_atomic(p, &bytes).with_context(|| format!("while writing {}", p.display()))?;
        }
        return Ok(());
    }
    let results = measure(&args, &shapes)?;
    out(&table(&results))?;
    if let Some(p) = &args.json {
        dejavu::store::write_json(p, &results).with_context(|| format!("while writing {}", p.display()))?;
    }
    if let Some(p) = &args.csv {
        let bytes = dejavu::bench::csv(&results)?;
        dejavu::store::write_atomic(p, &bytes).with_context(|| format!("while writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn launch_cost(_args: &Args, _shapes: &[Shape]) -> anyhow::Result<()> {
    anyhow::bail!("bench runs on the CUDA engine: this binary was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)")
}

/// `--launch-cost`: measure every shape, print the table, write `--json`.
#[cfg(feature = "cuda")]
fn launch_cost(args: &Args, shapes: &[Shape]) -> anyhow::Result<()> {
    use dejavu::cuda::launch_bench::{needed_bytes, run, table};
    use dejavu::cuda::Gpu;

    dejavu::cuda::probe().map_err(|e| anyhow::anyhow!("bench: {e}"))?;
    let dt = args.dtype.unwrap_or(Half::F16);
    let mut rows = Vec::new();
    for sh in shapes {
        {
            let gpu = Gpu::new(0).map_err(|e| anyhow::anyhow!("bench: {e}"))?;
            let need = needed_bytes(sh, args.chain);
            let (free, _) = gpu.mem_info().map_err(|e| anyhow::anyhow!("bench: {e}"))?;
            if need > free {
                anyhow::bail!("--shape {}: --launch-cost with --chain {} needs {:.1} GB, the GPU has {:.1} GB free", sh.name, args.chain, need as f64 / 1e9, free as f64 / 1e9);
            }
        }
        let r = run(sh, dt, args.chain, args.reps).map_err(|e| anyhow::anyhow!("bench --launch-cost {}: {e}", sh.name))?;
        for l in table(&r).lines().skip(2) {
            eprintln!("{l}");
        }
        rows.extend(r);
    }
    out(&table(&rows))?;
    if let Some(p) = &args.json {
        dejavu::store::write_json(p, &rows).with_context(|| format!("while writing {}", p.display()))?;
    }
    Ok(())
}

#[cfg(not(feature = "cuda"))]
fn measure(_args: &Args, _shapes: &[Shape]) -> anyhow::Result<Vec<BenchResult>> {
    anyhow::bail!("bench runs on the CUDA engine: this binary was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)")
}

#[cfg(not(feature = "cuda"))]
fn measure_mlp(_args: &Args, _shapes: &[Shape]) -> anyhow::Result<Vec<dejavu::bench::MlpBlockResult>> {
    anyhow::bail!("bench runs on the CUDA engine: this binary was built without the `cuda` feature (rebuild with `cargo build --release --features cuda`)")
}

#[cfg(feature = "cuda")]
fn measure_mlp(args: &Args, shapes: &[Shape]) -> anyhow::Result<Vec<dejavu::bench::MlpBlockResult>> {
    use dejavu::cuda::mlp_bench::{needed_bytes, run};
    use dejavu::cuda::Gpu;

    dejavu::cuda::probe().map_err(|e| anyhow::anyhow!("bench: {e}"))?;
    let dt = args.dtype.unwrap_or(Half::F16);
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    let mut results = Vec::new();
    for sh in shapes {
        {
            let gpu = Gpu::new(0).map_err(|e| anyhow::anyhow!("bench: {e}"))?;
            let need = needed_bytes(sh, max_batch);
            let (free, _) = gpu.mem_info().map_err(|e| anyhow::anyhow!("bench: {e}"))?;
            if need > free {
                anyhow::bail!("--shape {}: one MLP block needs {:.1} GB, the GPU has {:.1} GB free", sh.name, need as f64 / 1e9, free as f64 / 1e9);
            }
        }
        let rows = run(sh, dt, &args.batch, &args.keep, args.reps, args.rule, args.rank).map_err(|e| anyhow::anyhow!("bench --mlp-block {}: {e}", sh.name))?;
        for r in &rows {
            eprintln!("{}", dejavu::bench::mlp_table(std::slice::from_ref(r)).lines().nth(2).unwrap_or_default());
        }
        results.extend(rows);
    }
    Ok(results)
}

#[cfg(feature = "cuda")]
fn measure(args: &Args, shapes: &[Shape]) -> anyhow::Result<Vec<BenchResult>> {
    use dejavu::cuda::bench::{needed_bytes, run, BenchOpts};
    use dejavu::cuda::{Engine, Gpu, Weights};

    dejavu::cuda::probe().map_err(|e| anyhow::anyhow!("bench: {e}"))?;
    let mut results = Vec::new();
    let opts = |batch: usize| BenchOpts { batch, prompt: args.prompt, tokens: args.tokens, warmup: args.warmup, breakdown: args.breakdown, seed: 7 };
    let max_batch = args.batch.iter().copied().max().unwrap_or(1);
    if let Some(m) = &args.model {
        let files = super::common::resolve(m)?;
        if let Some(limit) = files.config.position_limit().filter(|&l| args.prompt + args.tokens + 1 > l) {
            return Err(usage(format!("--prompt + --tokens exceed the model's max_position_embeddings {limit}")));
        }
        let (dec, info) = dejavu::cuda::CudaDecoder::load(&files, args.dtype, 0, |_| {}).map_err(|e| anyhow::anyhow!("bench: {e}"))?;
        eprintln!("{}: weights uploaded in {:.2}s", files.identity, info.upload_seconds);
        let mut engine = dec.engine;
        for &b in &args.batch {
            let r = run(&mut engine, &files.identity, "model", &opts(b)).map_err(|e| anyhow::anyhow!("bench {}: {e}", files.identity))?;
            eprintln!("{}", table(std::slice::from_ref(&r)).lines().nth(2).unwrap_or_default());
            results.push(r);
        }
        return Ok(results);
    }
    for sh in shapes {
        let mut cfg = sh.config();
        if args.kernels {
            cfg.layers = cfg.layers.min(args.kernel_layers);
        }
        let dt = args.dtype.unwrap_or(Half::F16);
        let gpu = Gpu::new(0).map_err(|e| anyhow::anyhow!("bench: {e}"))?;
        let plan = args.mode.map_or(0, |m| dejavu::cuda::bench::plan_bytes(&cfg, m, args.head_sparsity, args.rank, args.neuron_input));
        let need = needed_bytes(&cfg, &opts(max_batch)) + plan;
        let (free, total) = gpu.mem_info().map_err(|e| anyhow::anyhow!("bench: {e}"))?;
        if need > free {
            eprintln!(
                "bench --shape {}: needs {:.1} GB (weights, KV cache and scratch at batch {max_batch}{}), the GPU has {:.1} GB free of {:.1} GB; skipped",
                sh.name,
                need as f64 / 1e9,
                if plan > 0 { format!(", the sparse plan's copies and predictors {:.1} GB", plan as f64 / 1e9) } else { String::new() },
                free as f64 / 1e9,
                total as f64 / 1e9
            );
            if shapes.len() == 1 {
                anyhow::bail!("--shape {}: does not fit this GPU's memory ({:.1} GB needed, {:.1} GB free)", sh.name, need as f64 / 1e9, free as f64 / 1e9);
            }
            continue;
        }
        let k = dejavu::cuda::kernels::Kernels::load(gpu.arch).map_err(|e| anyhow::anyhow!("bench: {e}"))?;
        let w = Weights::random(&gpu, &k, &cfg, dt, 1).map_err(|e| anyhow::anyhow!("bench: {e}"))?;
        let mut engine = Engine::new(gpu, k, w, cfg).map_err(|e| anyhow::anyhow!("bench: {e}"))?;
        let (label, bytes) = match args.mode {
            Some(m) => {
                let (l, b) = dejavu::cuda::bench::random_plan(&mut engine, m, args.head_sparsity, args.head_kv == dejavu::sparse::HeadKv::Kept, args.rank, args.neuron_input).map_err(|e| anyhow::anyhow!("bench {}: {e}", sh.name))?;
                (format!("random, {l}"), Some(b))
            }
            None => ("random".to_string(), None),
        };
        for &b in &args.batch {
            let r = dejavu::cuda::bench::run_plan(&mut engine, sh.name, &label, &opts(b), bytes).map_err(|e| anyhow::anyhow!("bench {}: {e}", sh.name))?;
            eprintln!("{}", table(std::slice::from_ref(&r)).lines().nth(2).unwrap_or_default());
            results.push(r);
            if args.kernels {
                use dejavu::cuda::step_profile::{profile, tables};
                let (total, rows) = profile(&mut engine, b, args.prompt, args.reps, |n, of| {
                    if n % 16 == 0 {
                        eprintln!("bench --kernels {}: prefix {n} of {of}", sh.name);
                    }
                })
                .map_err(|e| anyhow::anyhow!("bench --kernels {}: {e}", sh.name))?;
                out(&tables(&format!("{} ({} layers), {label}, batch {b}", sh.name, engine.ctx.cfg.layers), total, &rows))?;
            }
        }
    }
    if results.is_empty() {
        anyhow::bail!("no shape fit this GPU");
    }
    Ok(results)
}
