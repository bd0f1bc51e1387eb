//! Arguments and helpers shared by subcommands: which model, which device, which sparse mode, loading with a
//! progress bar, and the decoder a command runs on.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use dejavu::backend::{dispatch, BackendTask, DeviceKind};
use dejavu::calibrate::Thresholds;
use dejavu::decode::RefDecoder;
use dejavu::model::{QScorer, Scorer};
use dejavu::sparse::calib::RuleCalibration;
use dejavu::sparse::quant::QScoreCopies;
use dejavu::predictor::Predictors;
use dejavu::sparse::{self, Artifacts, HeadKv, Mode, Plan, PlanOptions, PredictorBudget};
use dejavu::source::ModelIdentity;
use dejavu::{Model, ModelConfig, ModelFiles};

use super::{usage, usage_of};

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct ModelArgs {
    /// Model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json), a GGUF file, or a Hub id
    /// such as facebook/opt-125m (read from the hf-hub cache; downloaded unless HF_HUB_OFFLINE=1).
    #[arg(long, short = 'm')]
    pub model: String,
    /// Where the model runs. `generate`, `ppl` and `eval` run `cuda` on dejavu's own CUDA engine; `collect`,
    /// `train-predictors` and `calibrate` run it on burn-cuda. `burn-cuda` runs the reference forward on burn CUDA
    /// for every command, with every mode (the engine refuses oracle, cascade, teal and wina).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
}

/// Fail early, naming the flag, when `--device` cannot run here.
pub fn check_device(kind: DeviceKind) -> anyhow::Result<()> {
    dejavu::backend::check(kind).map_err(|e| anyhow::anyhow!("--device {}: {e:#}", kind.name()))
}

pub fn resolve(spec: &str) -> anyhow::Result<ModelFiles> {
    ModelFiles::resolve(spec).with_context(|| format!("while opening model `{spec}`"))
}

/// Load the weights onto the device, showing a bar over layers.
pub fn load_model<B: Backend>(files: &ModelFiles, device: &B::Device, quiet: bool) -> anyhow::Result<Model<B>> {
    let t0 = Instant::now();
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(files.config.layers as u64) };
    bar.set_style(
        ProgressStyle::with_template("loading {msg} [{bar:30}] {pos}/{len} layers ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(files.identity.clone());
    let model = Model::<B>::load(&files.config, files.checkpoint.as_ref(), device, |_| bar.inc(1))
        .with_context(|| format!("while loading the weights of `{}`", files.identity))?;
    bar.finish_and_clear();
    if !quiet {
        let c = &files.config;
        eprintln!(
            "loaded {} ({:?}, {} layers, d={}, ffn={}, heads={}/{}, {:.1}M params) in {:.1}s",
            files.identity,
            c.family,
            c.layers,
            c.hidden,
            c.ffn,
            c.heads,
            c.kv_heads,
            c.param_count() as f64 / 1e6,
            t0.elapsed().as_secs_f64()
        );
    }
    Ok(model)
}

/// A subcommand that resolves `--model`, then runs generic code on the chosen backend.
pub trait ModelCommand: Sized {
    fn run_on<B: Backend>(args: Self, files: ModelFiles, device: B::Device) -> anyhow::Result<()>;
}

struct WithModel<A> {
    args: A,
    files: ModelFiles,
}

impl<A: ModelCommand> BackendTask for WithModel<A> {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        A::run_on::<B>(self.args, self.files, device)
    }
}

/// Resolve the model `model` names and run `args` on the device it asks for.
pub fn run_with_model<A: ModelCommand>(model: &ModelArgs, args: A) -> anyhow::Result<()> {
    check_device(model.device)?;
    let files = resolve(&model.model)?;
    dispatch(model.device, WithModel { args, files })
}

/// `--help` heading of the sparse-mode flags.
const SPARSE: &str = "Sparse mode";

/// A model and the text files it reads (calibrate, collect).
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct CorpusArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Text files (UTF-8), read in order as one stream; streamed, never loaded whole.
    #[arg(long, num_args = 1.., required = true)]
    pub text: Vec<PathBuf>,
}

/// The model, device and sparse mode of a decoding command, and the artifacts the mode reads.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct DecodeArgs {
    #[command(flatten)]
    #[serde(flatten)]
    pub model: ModelArgs,
    /// Sparse mode: dense, cats@S (needs --thresholds), oracle@S, dejavu[@S] (needs --predictors), exactdown@S,
    /// qscore@S and cascade@S (qscore and cascade need --qscore), teal@S (needs --rules) or wina@S; add +greedy to
    /// exactdown, qscore, cascade, teal or wina for per-layer budgets from --rules. S is the fraction of MLP
    /// neurons dropped per token (teal, wina: of MLP input channels and of hidden neurons, each).
    #[arg(long, default_value = "dense", help_heading = SPARSE)]
    pub mode: Mode,
    /// Fraction of attention heads dropped per token (oracle: by output norm; dejavu: overrides the predictors' k).
    #[arg(long, value_name = "H", help_heading = SPARSE)]
    pub head_sparsity: Option<f64>,
    /// Key/value heads of a token's dropped heads (predicted heads): `all` computes and caches every key/value head
    /// at every position, as dense decoding does; `kept` skips a key/value head none of whose query heads is kept,
    /// and later queries of its heads do not attend to that position.
    #[arg(long, value_enum, value_name = "KV", default_value_t = HeadKv::All, help_heading = SPARSE)]
    #[serde(default)]
    pub head_kv: HeadKv,
    /// Thresholds file from `dejavu calibrate` (cats modes).
    #[arg(long, value_name = "FILE", help_heading = SPARSE)]
    pub thresholds: Option<PathBuf>,
    /// Predictor directory from `dejavu train-predictors` (dejavu modes; head predictors for the SwiGLU rules).
    #[arg(long, value_name = "DIR", help_heading = SPARSE)]
    pub predictors: Option<PathBuf>,
    /// Rule calibration from `dejavu calibrate --rule R` (RUN/rules.json): TEAL thresholds, per-layer budgets.
    #[arg(long, value_name = "FILE", help_heading = SPARSE)]
    pub rules: Option<PathBuf>,
    /// Low-bit score copies of gate/up from `dejavu calibrate --rule qscore` (RUN/qscore.safetensors).
    #[arg(long, value_name = "FILE", help_heading = SPARSE)]
    pub qscore: Option<PathBuf>,
    /// CUDA engine (`--device cuda`): the weights' type on the GPU (default: bf16 for a bf16 checkpoint, else
    /// f16; quantized GGUF weights are dequantized to it).
    #[arg(long, value_enum)]
    pub dtype: Option<dejavu::source::weights::Half>,
}

/// The artifacts [`DecodeArgs`] named, read and checked against the model.
pub struct Loaded<B: Backend> {
    /// The model's identity (fingerprint), computed once for the checks and for any header written later.
    pub identity: ModelIdentity,
    pub thresholds: Option<(PathBuf, Thresholds)>,
    pub predictors: Option<(PathBuf, Predictors<B>)>,
    pub rules: Option<(PathBuf, RuleCalibration)>,
    /// The score copies as the reference path reads them (dequantized on the burn device).
    pub qscore: Option<(PathBuf, QScorer<B>)>,
    /// The score copies as stored, for the CUDA engine (which packs them itself).
    pub qcopies: Option<(PathBuf, QScoreCopies)>,
}

impl DecodeArgs {
    /// Read the thresholds and predictors given (refusing those of another model), and check every mode in
    /// `modes` can be planned, before any model work.
    pub fn load<B: Backend>(&self, modes: &[Mode], files: &ModelFiles, device: &B::Device) -> anyhow::Result<Loaded<B>> {
        let identity = files.identity().context("while fingerprinting the model")?;
        let thresholds = match &self.thresholds {
            Some(p) => Some((p.clone(), Thresholds::load(p, &identity)?)),
            None => None,
        };
        let predictors = match &self.predictors {
            Some(d) => Some((d.clone(), Predictors::<B>::load(d, &identity, device)?)),
            None => None,
        };
        let rules = match &self.rules {
            Some(p) => Some((p.clone(), RuleCalibration::load(p, &identity)?)),
            None => None,
        };
        let (qscore, qcopies) = match &self.qscore {
            Some(p) => {
                let c = QScoreCopies::load(p, &identity)?;
                if uses_engine(&self.model) {
                    (None, Some((p.clone(), c)))
                } else {
                    (Some((p.clone(), QScorer::from_copies(&c, device))), None)
                }
            }
            None => (None, None),
        };
        let loaded = Loaded { identity, thresholds, predictors, rules, qscore, qcopies };
        for &m in modes {
            self.plan(m, &files.config, &loaded)?;
        }
        Ok(loaded)
    }

    /// The plan of `mode` (bad combinations are usage errors naming the flag).
    pub fn plan<B: Backend>(&self, mode: Mode, cfg: &ModelConfig, loaded: &Loaded<B>) -> anyhow::Result<Plan> {
        let art = Artifacts {
            thresholds: loaded.thresholds.as_ref().map(|(p, t)| (p.as_path(), t)),
            predictors: loaded.predictors.as_ref().map(|(d, p)| PredictorBudget {
                dir: d.as_path(),
                k_neurons: (0..p.layers()).map(|l| p.k_neurons(l)).collect(),
                k_heads: (0..p.layers()).map(|l| p.k_heads(l)).collect(),
            }),
            calibration: loaded.rules.as_ref().map(|(p, c)| (p.as_path(), c)),
            qscore: loaded.qscore.as_ref().map(|(p, _)| p.as_path()).or(loaded.qcopies.as_ref().map(|(p, _)| p.as_path())),
        };
        sparse::resolve(mode, &PlanOptions { head_sparsity: self.head_sparsity, head_kv: self.head_kv }, cfg, &art).map_err(usage_of)
    }
}

impl<B: Backend> Loaded<B> {
    /// A reference decoder running `plan`, counting realised sparsity when the plan is sparse.
    pub fn decoder<'a>(&'a self, model: &'a Model<B>, plan: &'a Plan) -> anyhow::Result<RefDecoder<'a, B>> {
        let scorer = self.predictors.as_ref().map(|(_, p)| p as &dyn Scorer<B>);
        let qscore = self.qscore.as_ref().map(|(_, q)| q);
        Ok(RefDecoder::with_qscore(model, plan, scorer, qscore).map_err(usage_of)?.counting(!plan.is_dense()))
    }
}

/// The sliding window of perplexity scoring.
#[derive(Debug, Clone, Copy, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct WindowArgs {
    /// Window length in tokens.
    #[arg(long, default_value_t = 512)]
    pub ctx: usize,
    /// Step between window starts (default: --ctx); each window scores only tokens past the previous window's end.
    #[arg(long)]
    pub stride: Option<usize>,
}

impl WindowArgs {
    /// The stride, after checking both values (and, for learned position tables, the window against `limit`).
    pub fn stride(&self, limit: Option<usize>) -> anyhow::Result<usize> {
        let ctx = self.ctx;
        if ctx < 2 {
            return Err(usage(format!("--ctx must be at least 2 (got {ctx})")));
        }
        let stride = self.stride.unwrap_or(ctx);
        if stride == 0 || stride > ctx {
            return Err(usage(format!("--stride must be in 1..=--ctx ({ctx}) (got {stride})")));
        }
        if let Some(max) = limit.filter(|&m| ctx > m) {
            return Err(usage(format!("--ctx {ctx} exceeds the model's max_position_embeddings {max}")));
        }
        Ok(stride)
    }
}

/// Read and tokenize a text file, keeping the first `max_tokens` ids.
pub fn tokenize_file(files: &ModelFiles, path: &std::path::Path, max_tokens: Option<usize>) -> anyhow::Result<Vec<u32>> {
    let bytes = std::fs::read(path).with_context(|| format!("while reading {}", path.display()))?;
    let text = String::from_utf8(bytes)
        .map_err(|e| anyhow::anyhow!("{}: not UTF-8 text (invalid byte at offset {})", path.display(), e.utf8_error().valid_up_to()))?;
    let enc = files.tokenizer.encode(text.as_str(), true).map_err(|e| anyhow::anyhow!("{}: tokenization failed: {e}", path.display()))?;
    let mut ids: Vec<u32> = enc.get_ids().to_vec();
    if let Some(n) = max_tokens {
        ids.truncate(n);
    }
    Ok(ids)
}

/// The decoder a command runs on: the burn reference (any `--device` but cuda), or the CUDA engine
/// (`--device cuda` in `generate`, `ppl` and `eval`).
pub enum AnyDecoder<'a, B: Backend> {
    Ref(RefDecoder<'a, B>),
    #[cfg(feature = "cuda")]
    Cuda(Box<dejavu::cuda::CudaDecoder>),
}

impl<B: Backend> AnyDecoder<'_, B> {
    /// Run `plan` on the engine, with what it reads from `loaded`: the score copies (`qscore` layers) and the MLP
    /// predictors, folded for the GPU (`dejavu` layers). The reference's decoders are built per plan and ignore this.
    pub fn set_plan(&mut self, plan: &Plan, loaded: &Loaded<B>) -> anyhow::Result<()> {
        let _ = (plan, loaded); // unused without the cuda feature
        match self {
            AnyDecoder::Ref(_) => Ok(()),
            #[cfg(feature = "cuda")]
            AnyDecoder::Cuda(d) => {
                let mlp = plan.layers.iter().any(|l| matches!(l.mlp, dejavu::sparse::MlpRule::PredictedTopK { .. }));
                let heads = plan.layers.iter().any(|l| matches!(l.heads, dejavu::sparse::HeadRule::PredictedTopK { .. }));
                let fold = |want: bool, heads: bool| -> Option<Vec<dejavu::predictor::FoldedPredictor>> {
                    match &loaded.predictors {
                        Some((_, p)) if want => Some((0..p.layers()).map(|l| p.host(l, heads).fold()).collect()),
                        _ => None,
                    }
                };
                let (fm, fh) = (fold(mlp, false), fold(heads, true));
                let art = dejavu::cuda::engine::GpuArtifacts {
                    qscore: loaded.qcopies.as_ref().map(|(_, c)| c),
                    mlp_predictors: fm.as_deref(),
                    head_predictors: fh.as_deref(),
                    mlp_input: loaded.predictors.as_ref().map_or(dejavu::predictor::NeuronInput::Mlp, |(_, p)| p.neuron_input()),
                };
                d.set_plan(plan, &art).map_err(|e| anyhow::anyhow!("--device cuda: {e}"))
            }
        }
    }

    pub fn as_dyn(&mut self) -> &mut dyn dejavu::decode::Decoder {
        match self {
            AnyDecoder::Ref(d) => d,
            #[cfg(feature = "cuda")]
            AnyDecoder::Cuda(d) => d.as_mut(),
        }
    }
}

/// What a command that runs several plans decodes on: the reference model (a decoder per plan over it) or the
/// CUDA engine (one decoder for every plan).
pub struct Decoders<B: Backend> {
    model: Option<Model<B>>,
    engine: Option<AnyDecoder<'static, B>>,
}

/// A decoder running one plan: a reference decoder of its own, or the shared engine.
pub enum PlanDecoder<'a, B: Backend> {
    Own(AnyDecoder<'a, B>),
    Shared(&'a mut AnyDecoder<'static, B>),
}

impl<B: Backend> PlanDecoder<'_, B> {
    pub fn as_dyn(&mut self) -> &mut dyn dejavu::decode::Decoder {
        match self {
            PlanDecoder::Own(d) => d.as_dyn(),
            PlanDecoder::Shared(d) => d.as_dyn(),
        }
    }
}

impl<B: Backend> Decoders<B> {
    /// Load the model for the reference, or start the engine for `--device cuda`.
    pub fn load(files: &ModelFiles, args: &DecodeArgs, device: &B::Device) -> anyhow::Result<Self> {
        if uses_engine(&args.model) {
            Ok(Decoders { model: None, engine: Some(engine_decoder::<B>(files, args, false)?) })
        } else {
            Ok(Decoders { model: Some(load_model::<B>(files, device, false)?), engine: None })
        }
    }

    /// A decoder running `plan`.
    pub fn for_plan<'a>(&'a mut self, loaded: &'a Loaded<B>, plan: &'a Plan) -> anyhow::Result<PlanDecoder<'a, B>> {
        match (&self.model, &mut self.engine) {
            (Some(m), _) => Ok(PlanDecoder::Own(AnyDecoder::Ref(loaded.decoder(m, plan)?))),
            (None, Some(e)) => {
                e.set_plan(plan, loaded)?;
                Ok(PlanDecoder::Shared(e))
            }
            (None, None) => anyhow::bail!("internal: no decoder"),
        }
    }
}

/// Whether `--device` selects the CUDA engine for a decoding command.
pub fn uses_engine(model: &ModelArgs) -> bool {
    model.device == DeviceKind::Cuda
}

/// Run a decoding command: on the CUDA engine for `--device cuda` (burn stays on the CPU and idle: generic code
/// is instantiated with the CPU backend and the command builds its decoder with [`engine_decoder`]), else on the
/// burn backend `--device` names.
pub fn run_decoding<A: ModelCommand>(model: &ModelArgs, args: A) -> anyhow::Result<()> {
    check_device(model.device)?;
    let files = resolve(&model.model)?;
    let kind = if uses_engine(model) { DeviceKind::Cpu } else { model.device };
    dispatch(kind, WithModel { args, files })
}

/// The decoder a decoding command asked for: the CUDA engine for `--device cuda`, else the reference running
/// `plan` over the model, loaded into `slot` (which must outlive the decoder).
pub fn decoder_for<'a, B: Backend>(
    args: &DecodeArgs,
    files: &ModelFiles,
    device: &B::Device,
    loaded: &'a Loaded<B>,
    plan: &'a Plan,
    slot: &'a mut Option<Model<B>>,
) -> anyhow::Result<AnyDecoder<'a, B>> {
    if uses_engine(&args.model) {
        let mut dec = engine_decoder::<B>(files, args, false)?;
        dec.set_plan(plan, loaded)?;
        return Ok(dec);
    }
    let model: &'a Model<B> = slot.insert(load_model::<B>(files, device, false)?);
    Ok(AnyDecoder::Ref(loaded.decoder(model, plan)?))
}

/// Refuse what the engine cannot run yet, naming the flag: it runs `dense`, `cats@S`, `exactdown@S`, `qscore@S`
/// (with or without `+greedy`) and `dejavu@S` on the MLP through the sparse kernels, and predicted heads on
/// attention.
pub fn check_engine_mode(args: &DecodeArgs, modes: &[Mode]) -> anyhow::Result<()> {
    if uses_engine(&args.model) {
        if let Some(m) = modes.iter().find(|m| !matches!(m, Mode::Dense | Mode::Cats(_) | Mode::ExactDown(..) | Mode::QScore(..) | Mode::Dejavu(_))) {
            return Err(usage(format!(
                "--mode {m}: the CUDA engine runs dense, cats@S, exactdown@S, qscore@S and dejavu@S today (the other rules' GPU kernels are not written yet); run {m} with --device cpu, or on the GPU through burn with --device burn-cuda"
            )));
        }
    }
    Ok(())
}

/// The CUDA engine's decoder for `files`, with a start-up line on stderr.
#[cfg(feature = "cuda")]
pub fn engine_decoder<'a, B: Backend>(files: &ModelFiles, args: &DecodeArgs, quiet: bool) -> anyhow::Result<AnyDecoder<'a, B>> {
    let t0 = Instant::now();
    let bar = if quiet { ProgressBar::hidden() } else { ProgressBar::new(files.config.layers as u64) };
    bar.set_style(
        ProgressStyle::with_template("uploading {msg} [{bar:30}] {pos}/{len} layers ({elapsed})")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar.set_message(files.identity.clone());
    let (dec, info) = dejavu::cuda::CudaDecoder::load(files, args.dtype, 0, |_| bar.inc(1))
        .map_err(|e| anyhow::anyhow!("--device cuda: {e}"))?;
    bar.finish_and_clear();
    if !quiet {
        eprintln!(
            "CUDA engine on {}: {} ({} weights, {:.2} GB) ready in {:.2}s (kernels {} in {:.2}s, upload {:.2}s)",
            info.device,
            files.identity,
            dec.engine.ctx.w.dt.name(),
            info.weight_bytes as f64 / 1e9,
            t0.elapsed().as_secs_f64(),
            if info.module_from_cache { "from the disk cache" } else { "compiled by NVRTC" },
            info.module_seconds,
            info.upload_seconds
        );
    }
    Ok(AnyDecoder::Cuda(Box::new(dec)))
}

#[cfg(not(feature = "cuda"))]
pub fn engine_decoder<'a, B: Backend>(_files: &ModelFiles, _args: &DecodeArgs, _quiet: bool) -> anyhow::Result<AnyDecoder<'a, B>> {
    // `check_device` refuses `--device cuda` in a build without the feature before any model work.
    Err(anyhow::anyhow!("--device cuda: this binary was built without the `cuda` feature"))
}

/// Fail before any model work when the file `path` could not be written at the end: its directory is created
/// when missing and must accept a new file. The message names the path.
pub fn check_output_file(path: &std::path::Path) -> anyhow::Result<()> {
    if path.is_dir() {
        anyhow::bail!("{}: is a directory, not a file to write", path.display());
    }
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(std::path::Path::new("."));
    check_output_dir(dir).with_context(|| format!("while checking that {} can be written", path.display()))
}

/// [`check_output_file`] for a directory that will receive files: created when missing, and writable.
pub fn check_output_dir(dir: &std::path::Path) -> anyhow::Result<()> {
    if dir.exists() && !dir.is_dir() {
        anyhow::bail!("{}: exists and is not a directory", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("while creating the directory {}", dir.display()))?;
    let probe = dir.join(format!(".dejavu-write-check-{}", std::process::id()));
    std::fs::File::create(&probe).with_context(|| format!("{}: cannot create files in this directory", dir.display()))?;
    let _ = std::fs::remove_file(&probe);
    Ok(())
}
