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
use dejavu::model::Scorer;
use dejavu::predictors::Predictors;
use dejavu::sparse::{self, Artifacts, Mode, Plan, PlanOptions, PredictorBudget};
use dejavu::{Model, ModelConfig, ModelFiles};

use super::usage_of;

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct ModelArgs {
    /// Model: a Hugging Face directory (config.json, *.safetensors, tokenizer.json), a GGUF file, or a Hub id
    /// such as facebook/opt-125m (read from the hf-hub cache; downloaded unless HF_HUB_OFFLINE=1).
    #[arg(long, short = 'm')]
    pub model: String,
    /// Where the reference forward runs.
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
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
    fn model_args(&self) -> &ModelArgs;
    fn run_on<B: Backend>(self, files: ModelFiles, device: B::Device) -> anyhow::Result<()>;
}

struct WithModel<A> {
    args: A,
    files: ModelFiles,
}

impl<A: ModelCommand> BackendTask for WithModel<A> {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        self.args.run_on::<B>(self.files, device)
    }
}

/// Resolve the model `args` names and run it on the device it asks for.
pub fn run_with_model<A: ModelCommand>(args: A) -> anyhow::Result<()> {
    let files = resolve(&args.model_args().model)?;
    let device = args.model_args().device;
    dispatch(device, WithModel { args, files })
}

/// The sparse mode of a decoding command and the artifacts it reads.
#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct SparseArgs {
    /// Sparse mode: dense, cats@S (needs --thresholds), oracle@S, or dejavu[@S] (needs --predictors); S is the
    /// fraction of MLP neurons dropped per token.
    #[arg(long, default_value = "dense")]
    pub mode: Mode,
    /// Fraction of attention heads dropped per token (oracle: by output norm; dejavu: overrides the predictors' k).
    #[arg(long)]
    pub head_sparsity: Option<f64>,
    /// Thresholds file from `dejavu calibrate` (cats modes).
    #[arg(long)]
    pub thresholds: Option<PathBuf>,
    /// Predictor directory from `dejavu train-predictors` (dejavu modes).
    #[arg(long)]
    pub predictors: Option<PathBuf>,
}

/// The artifacts [`SparseArgs`] named, read and checked against the model.
pub struct Loaded<B: Backend> {
    pub thresholds: Option<(PathBuf, Thresholds)>,
    pub predictors: Option<(PathBuf, Predictors<B>)>,
}

impl SparseArgs {
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
        let loaded = Loaded { thresholds, predictors };
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
        };
        sparse::resolve(mode, &PlanOptions { head_sparsity: self.head_sparsity }, cfg, &art).map_err(usage_of)
    }
}

impl<B: Backend> Loaded<B> {
    /// A reference decoder running `plan`, counting realised sparsity when the plan is sparse.
    pub fn decoder<'a>(&'a self, model: &'a Model<B>, plan: &'a Plan) -> anyhow::Result<RefDecoder<'a, B>> {
        let scorer = self.predictors.as_ref().map(|(_, p)| p as &dyn Scorer<B>);
        Ok(RefDecoder::new(model, plan, scorer).map_err(usage_of)?.counting(!plan.is_dense()))
    }
}
