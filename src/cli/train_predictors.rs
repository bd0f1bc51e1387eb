//! `dejavu train-predictors`: train per-layer neuron and head predictors from RUN/acts into RUN/predictors.

use std::path::PathBuf;
use std::time::Instant;

use anyhow::Context;
use burn::tensor::backend::Backend;

use dejavu::backend::{dispatch, BackendTask, DeviceKind};
use dejavu::collect::Activations;
use dejavu::predictor::{default_rank, train, NeuronInput, NeuronTarget, TrainEvent, TrainOptions};


#[derive(Debug, Clone, clap::Args, serde::Deserialize)]
pub struct Args {
    /// Run directory holding RUN/acts (from `dejavu collect`); predictors go to RUN/predictors.
    #[arg(long)]
    pub run: PathBuf,
    /// Optional: the model the activations must come from (path, GGUF or Hub id); refused when the activations
    /// manifest names another model.
    #[arg(long, short = 'm')]
    pub model: Option<String>,
    /// Where training runs (cpu: burn Flex; ndarray; cuda).
    #[arg(long, value_enum, default_value_t = DeviceKind::Cpu)]
    pub device: DeviceKind,
    /// Predictor rank r (Linear(d, r) → Linear(r, n)). Default: hidden/4 rounded down to a multiple of 32,
    /// within 16..=1024 (SmolLM2: 128, OPT-1.3B: 512, OPT-6.7B and up: 1024).
    #[arg(long)]
    pub rank: Option<usize>,
    /// Maximum epochs (early stopping usually ends sooner).
    #[arg(long, default_value_t = 20)]
    pub epochs: usize,
    /// Epochs without a better held-out k before stopping.
    #[arg(long, default_value_t = 3)]
    pub patience: usize,
    /// Tokens per training step (minibatch).
    #[arg(long, default_value_t = 1024)]
    pub batch_size: usize,
    /// AdamW learning rate.
    #[arg(long, default_value_t = 1e-3)]
    pub lr: f64,
    /// AdamW decoupled weight decay.
    #[arg(long, default_value_t = 1e-2)]
    pub weight_decay: f32,
    /// Fraction of tokens held out (the tail of the collected stream).
    #[arg(long, default_value_t = 0.1)]
    pub holdout: f64,
    /// Neuron recall the chosen k must reach on held-out tokens.
    #[arg(long, default_value_t = 0.99)]
    pub target_recall: f64,
    /// Head recall the chosen k must reach on held-out tokens.
    #[arg(long, default_value_t = 0.95)]
    pub head_target_recall: f64,
    /// Llama: fraction of neurons labelled active per token (top-k of the --neuron-target activation). OPT
    /// labels by ReLU > 0.
    #[arg(long, default_value_t = 0.5)]
    pub neuron_density: f64,
    /// Llama: what the neuron labels rank: `act` = |SiLU(gate)·up| (each neuron's contribution to the MLP output)
    /// or `gate` = |SiLU(gate)| (CATS' criterion, a function of one linear projection).
    #[arg(long, value_enum, default_value = "act")]
    #[serde(default)]
    pub neuron_target: NeuronTarget,
    /// What each layer's neuron predictor reads: `mlp` = the residual entering the layer's MLP (after its
    /// attention; the most accurate), `block` = the residual entering the layer (Deja Vu's look-ahead: on the
    /// CUDA engine the MLP's kept set is then predicted on a side stream while the layer's attention runs), or
    /// `prev` = the residual entering the layer before it (layer 0: its own), as the head predictors read it.
    #[arg(long, value_enum, default_value = "mlp")]
    #[serde(default)]
    pub neuron_input: NeuronInput,
    /// Fraction of heads labelled active per token (top-k of head output norm).
    #[arg(long, default_value_t = 0.5)]
    pub head_density: f64,
    /// Seed of the weight initialisation and the minibatch order (each layer derives its own from it).
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Use at most this many collected tokens.
    #[arg(long)]
    pub max_tokens: Option<usize>,
    /// Held-out tokens scored after each epoch for early stopping.
    #[arg(long, default_value_t = 4096)]
    pub eval_tokens: usize,
    /// Train only these layers (comma-separated), e.g. to time one layer; the result cannot be loaded as a full
    /// set of predictors.
    #[arg(long, value_delimiter = ',')]
    pub layers: Option<Vec<usize>>,
    /// Layers trained at once. Default: the CPU cores on --device cpu, 1 on a GPU.
    #[arg(long)]
    pub jobs: Option<usize>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let acts = Activations::open(&args.run).context("while opening the activations")?;
    if let Some(spec) = &args.model {
        let files = super::common::resolve(spec)?;
        let id = files.identity().with_context(|| format!("while fingerprinting model `{spec}`"))?;
        acts.check_model(&id)?;
    }
    if args.neuron_target == NeuronTarget::Gate && acts.manifest.model().family != dejavu::Family::Llama {
        anyhow::bail!(
            "{}: --neuron-target gate needs a Llama model (these activations are of an OPT model, labelled by ReLU > 0)",
            acts.manifest_path().display()
        );
    }
    super::common::check_device(args.device)?;
    dispatch(args.device, Task { args, acts })
}

struct Task {
    args: Args,
    acts: Activations,
}

impl BackendTask for Task {
    type Output = ();
    fn run<B: Backend>(self, device: B::Device) -> anyhow::Result<()> {
        let Task { args, acts } = self;
        let m = &acts.manifest;
        let id = m.model();
        let jobs = args.jobs.unwrap_or(match args.device {
            DeviceKind::Cpu | DeviceKind::Ndarray => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            _ => 1,
        });
        let opts = TrainOptions {
            rank: args.rank.unwrap_or_else(|| default_rank(id.hidden)),
            epochs: args.epochs,
            batch_size: args.batch_size,
            lr: args.lr,
            weight_decay: args.weight_decay,
            patience: args.patience.max(1),
            holdout: args.holdout,
            target_recall: args.target_recall,
            head_target_recall: args.head_target_recall,
            neuron_density: args.neuron_density,
            neuron_target: args.neuron_target,
            neuron_input: args.neuron_input,
            head_density: args.head_density,
            seed: args.seed,
            max_tokens: args.max_tokens.unwrap_or(usize::MAX),
            eval_tokens: args.eval_tokens,
            layers: args.layers.clone(),
            jobs,
        };
        let n_layers = opts.layers.as_ref().map(|v| v.len()).unwrap_or(id.layers);
        eprintln!(
            "training predictors for {} ({} layers, d={}, ffn={}, heads={}) on {} tokens, rank {}, {} job(s)",
            id.source,
            n_layers,
            id.hidden,
            id.ffn,
            id.heads,
            m.tokens.min(opts.max_tokens),
            opts.rank,
            jobs
        );
        let bar = super::progress::bar((n_layers * 2 * opts.epochs) as u64, "train [{bar:30}] {pos}/{len} epochs, layers done {msg} ({elapsed}, eta {eta})");
        let done = std::sync::atomic::AtomicUsize::new(0);
        bar.set_message(format!("0/{n_layers}"));
        let t0 = Instant::now();
        let on_event = |e: TrainEvent| match e {
            TrainEvent::Epoch { .. } => bar.inc(1),
            TrainEvent::Stopped { skipped, .. } => bar.inc(skipped as u64),
            TrainEvent::LayerDone(_) => {
                let d = done.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1;
                bar.set_message(format!("{d}/{n_layers}"));
            }
        };
        let pm = train::<B>(&acts, &opts, &device, &on_event)
            .with_context(|| format!("while training predictors from {}", acts.dir.display()))?;
        bar.finish_and_clear();
        let secs = t0.elapsed().as_secs_f64();
        println!("| layer | k_neurons | density | recall | precision | label density | recall@ffn/2 | k_heads | heads kept | head recall | head precision | head recall@70% | epochs n/h | s |");
        println!("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|");
        for r in &pm.layers {
            println!(
                "| {} | {}/{} | {:.3} | {:.4} | {:.4} | {:.3} | {:.4} | {}/{} | {:.3} | {:.4} | {:.4} | {:.4} | {}/{} | {:.1} |",
                r.layer,
                r.k_neurons,
                r.ffn,
                r.neuron_density,
                r.neuron_recall,
                r.neuron_precision,
                r.neuron_label_density,
                r.neuron_recall_at_half,
                r.k_heads,
                r.heads,
                r.head_density,
                r.head_recall,
                r.head_precision,
                r.head_recall_at_70,
                r.neuron_epochs,
                r.head_epochs,
                r.seconds
            );
        }
        let n = pm.layers.len().max(1) as f64;
        let mean = |f: fn(&dejavu::predictor::LayerMetrics) -> f64| pm.layers.iter().map(f).sum::<f64>() / n;
        println!(
            "| mean | | {:.3} | {:.4} | {:.4} | {:.3} | {:.4} | | {:.3} | {:.4} | {:.4} | {:.4} | | |",
            mean(|r| r.neuron_density),
            mean(|r| r.neuron_recall),
            mean(|r| r.neuron_precision),
            mean(|r| r.neuron_label_density),
            mean(|r| r.neuron_recall_at_half),
            mean(|r| r.head_density),
            mean(|r| r.head_recall),
            mean(|r| r.head_precision),
            mean(|r| r.head_recall_at_70)
        );
        eprintln!(
            "trained {} layers in {:.1}s (rank {}, {} train / {} held-out tokens); wrote {}",
            pm.layers.len(),
            secs,
            pm.rank,
            pm.train_tokens,
            pm.heldout_tokens,
            acts.run.join("predictors").display()
        );
        Ok(())
    }
}
