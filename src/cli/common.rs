//! Arguments and helpers shared by subcommands: which model, which device, loading with a progress bar.

use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;
use indicatif::{ProgressBar, ProgressStyle};

use dejavu::backend::{dispatch, BackendTask, DeviceKind};
use dejavu::{Model, ModelFiles};

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

/// The flag that sets the library option `field` (snake_case field, kebab-case flag; collect's `texts` is
/// `--text`), so a library error that names the field can name the flag too.
pub fn flag_for(field: &str) -> String {
    match field {
        "texts" => "--text".into(),
        f => format!("--{}", f.replace('_', "-")),
    }
}
