//! `dejavu calibrate`: what a rule needs, at requested sparsity levels. `--rule cats` (default): CATS per-layer
//! thresholds from streaming histograms. `--rule qscore|exactdown|teal|wina` write into the run directory:
//! low-bit score copies of gate/up (RUN/qscore.safetensors), per-layer budgets and TEAL thresholds (RUN/rules.json).

use std::path::PathBuf;

use anyhow::Context;
use burn::tensor::backend::Backend;

use dejavu::calibrate::{criterion, quantize_model, threshold_plan, Calibrator, RuleCalibrator, ThresholdLevel, Thresholds};
use dejavu::model::QScorer;
use dejavu::calibrate::loss_curves;
use dejavu::sparse::calib::{budget_from_curves, Ranking, RuleCalibration, ERROR_LOSS};
use dejavu::sparse::plan::input_keep;
use dejavu::sparse::MlpRule;
use dejavu::sparse::quant::{QScheme, QuantOptions};
use dejavu::store::{ArtifactHeader, RunDir, QSCORE_FORMAT, QSCORE_VERSION, RULES_FORMAT, RULES_VERSION};
use dejavu::text::TokenWindows;
use dejavu::ModelFiles;

use super::common::{load_model, run_with_model, CorpusArgs, ModelCommand};
use super::usage;

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    #[command(flatten)]
    #[serde(flatten)]
    pub corpus: CorpusArgs,
    /// What to calibrate: cats (thresholds file, --out), qscore (low-bit score copies of gate/up, and per-layer
    /// budgets ranked by them at each --sparsity), exactdown (per-layer budgets ranked by the exact hidden value;
    /// also used by cascade@S+greedy), teal (TEAL's per-layer thresholds at each --sparsity, for teal@S, and
    /// per-layer budgets with each layer's thresholds, for teal@S+greedy) or wina (per-layer budgets, for
    /// wina@S+greedy; wina@S needs no calibration). All but cats write into --run.
    #[arg(long, value_enum, default_value_t = Rule::Cats)]
    #[serde(default)]
    pub rule: Rule,
    /// Target MLP sparsity levels (fraction of neurons zeroed), comma-separated, e.g. 0.5,0.7 (required for cats,
    /// exactdown, teal and wina; for qscore, the levels to allocate budgets at).
    #[arg(long, value_delimiter = ',')]
    pub sparsity: Vec<f64>,
    /// Calibration tokens.
    #[arg(long, default_value_t = 65536)]
    pub tokens: usize,
    /// Tokens per forward window.
    #[arg(long, default_value_t = 512)]
    pub seq_len: usize,
    /// Refinement passes per level: re-measure each layer's magnitudes with the earlier layers already masked at
    /// the current thresholds, so every layer (not only the first) realises the requested sparsity.
    #[arg(long, default_value_t = 1)]
    pub refine: usize,
    /// Output thresholds file (JSON) of --rule cats (default with --run: RUN/thresholds.json).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Run directory the rule's artifacts go into (created when missing).
    #[arg(long)]
    pub run: Option<PathBuf>,
    /// qscore: bits of the score copies.
    #[arg(long, default_value_t = 4)]
    pub qbits: u8,
    /// qscore: weights per group along each neuron's input row (one f16 scale each).
    #[arg(long, default_value_t = 32)]
    pub qgroup: usize,
    /// qscore: symmetric (scale only) or asymmetric (scale and minimum) groups.
    #[arg(long, value_enum, default_value_t = QScheme::Sym)]
    pub qscheme: QScheme,
    /// Budgets: neurons a layer gives up per greedy step (0: ffn/64).
    #[arg(long, default_value_t = 0)]
    pub budget_step: usize,
    /// Budgets: the smallest fraction of a layer's neurons it keeps.
    #[arg(long, default_value_t = 0.05)]
    pub budget_min_keep: f64,
    /// Budgets: what the greedy allocation minimises. `loss`: the measured KL divergence of the next-token
    /// distributions from the dense model's on the first --budget-tokens calibration tokens when one layer alone
    /// runs the rule (at the --budget-keeps fractions), layers assumed additive; `proxy`: the layer-local output error
    /// Σ h_j²·‖W_down[:, j]‖² / ‖x‖² over all --tokens (one dense pass, cheap; ranks neurons by one score, so not
    /// for teal or wina, whose budgets also move the input channels).
    #[arg(long, value_enum, default_value_t = BudgetError::Loss)]
    #[serde(default)]
    pub budget_error: BudgetError,
    /// Budgets with --budget-error loss: calibration tokens scored per forward (in --seq-len windows).
    #[arg(long, default_value_t = 512)]
    pub budget_tokens: usize,
    /// Budgets with --budget-error loss: the kept fractions each layer's loss is measured at (one forward per layer
    /// and fraction; linear in between). A finer grid lets the allocation stop between these points.
    #[arg(long, value_delimiter = ',', default_values_t = [0.7, 0.5, 0.3, 0.15, 0.05])]
    #[serde(default = "default_keeps")]
    pub budget_keeps: Vec<f64>,
}

fn default_keeps() -> Vec<f64> {
    vec![0.7, 0.5, 0.3, 0.15, 0.05]
}

/// The objective of the budget allocation.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum BudgetError {
    #[default]
    Loss,
    Proxy,
}

/// What `calibrate --rule` calibrates.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, clap::ValueEnum, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Rule {
    #[default]
    Cats,
    Qscore,
    Exactdown,
    Teal,
    Wina,
}

impl Rule {
    fn name(self) -> &'static str {
        match self {
            Rule::Cats => "cats",
            Rule::Qscore => "qscore",
            Rule::Exactdown => "exactdown",
            Rule::Teal => "teal",
            Rule::Wina => "wina",
        }
    }
}

pub fn run(mut args: Args) -> anyhow::Result<()> {
    for &s in &args.sparsity {
        if !(0.0..1.0).contains(&s) {
            return Err(usage(format!("--sparsity: {s} is not in [0, 1)")));
        }
    }
    if args.tokens == 0 || args.seq_len == 0 || args.budget_tokens == 0 {
        return Err(usage("--tokens, --seq-len and --budget-tokens must be positive"));
    }
    if matches!(args.rule, Rule::Cats | Rule::Teal) && args.sparsity.is_empty() {
        return Err(usage(format!("--rule {}: give --sparsity, e.g. --sparsity 0.5,0.7", args.rule.name())));
    }
    if matches!(args.rule, Rule::Exactdown | Rule::Wina) && args.sparsity.is_empty() {
        return Err(usage(format!("--rule {}: give --sparsity (the levels to allocate budgets at)", args.rule.name())));
    }
    if matches!(args.rule, Rule::Teal | Rule::Wina) && args.budget_error == BudgetError::Proxy {
        return Err(usage(format!(
            "--budget-error proxy ranks neurons by one exact score; --rule {} budgets move the input channels too: use --budget-error loss",
            args.rule.name()
        )));
    }
    match args.rule {
        Rule::Cats if args.out.is_none() => match &args.run {
            Some(run) => args.out = Some(RunDir::at(run).thresholds()),
            None => return Err(usage("--rule cats: give --out FILE or --run RUN")),
        },
        Rule::Cats => {}
        _ if args.run.is_none() => return Err(usage(format!("--rule {} writes into a run directory: give --run RUN", args.rule.name()))),
        _ if args.out.is_some() => return Err(usage("--out is for --rule cats; the other rules write into --run")),
        _ => {}
    }
    let q = QuantOptions { bits: args.qbits, group: args.qgroup, scheme: args.qscheme };
    if args.rule == Rule::Qscore {
        q.check().map_err(|e| usage(format!("--{}: {}", e.field, e.msg)))?;
    }
    if args.budget_keeps.is_empty() || args.budget_keeps.iter().any(|f| !(*f > 0.0 && *f < 1.0)) {
        return Err(usage(format!("--budget-keeps: give fractions in (0, 1), got {:?}", args.budget_keeps)));
    }
    if !(0.0..=1.0).contains(&args.budget_min_keep) {
        return Err(usage(format!("--budget-min-keep: {} is not in [0, 1]", args.budget_min_keep)));
    }
    run_with_model(&args.corpus.model.clone(), args)
}

/// `--rule qscore|exactdown|teal|wina`: write the rule's artifacts into the run directory.
fn run_rule<B: Backend>(args: Args, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
    use dejavu::config::Family;
    if files.config.family != Family::Llama {
        return Err(usage(format!("--rule {}: the SwiGLU rules need a Llama-family model", args.rule.name())));
    }
    let Some(run_path) = args.run.clone() else { return Err(usage("give --run RUN")) };
    let run = RunDir::create(&run_path)?;
    let identity = files.identity().context("while fingerprinting the model")?;
    let model = load_model::<B>(&files, &device, false)?;
    let mut qscorer: Option<QScorer<B>> = None;
    if args.rule == Rule::Qscore {
        let q = QuantOptions { bits: args.qbits, group: args.qgroup, scheme: args.qscheme };
        let header = ArtifactHeader::new(QSCORE_FORMAT, QSCORE_VERSION, identity.clone(), &args);
        let copies = quantize_model(&model, q, header).context("while quantizing gate/up")?;
        copies.save(&run.qscore()).context("while writing the score copies")?;
        eprintln!("wrote {} (int{} {:?}, groups of {}, {} bits per weight read)", run.qscore().display(), q.bits, q.scheme, q.group, q.bits_per_weight());
        qscorer = Some(QScorer::from_copies(&copies, &device));
    }
    if args.sparsity.is_empty() {
        return Ok(());
    }
    let ranking = match args.rule {
        Rule::Qscore => Ranking::QScore,
        Rule::Teal => Ranking::Teal,
        Rule::Wina => Ranking::Wina,
        Rule::Exactdown | Rule::Cats => Ranking::Exact,
    };
    let teal = args.rule == Rule::Teal;
    let c = &files.config;
    let by_loss = args.budget_error == BudgetError::Loss;
    // The dense pass over --tokens: TEAL's histograms, or the proxy's error curves.
    let mut cal = RuleCalibrator::new(c.layers, c.ffn, teal, !by_loss, ranking);
    let mut bar = indicatif::ProgressBar::hidden();
    if teal || !by_loss {
        bar = super::progress::bar(args.tokens as u64, "calibrate {msg} [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}");
        bar.set_message(args.rule.name());
        let mut windows = TokenWindows::new(&files.tokenizer, &args.corpus.text, args.seq_len, args.tokens)?;
        while let Some(w) = windows.next_window()? {
            cal.add_sequence(&model, &w, qscorer.as_ref()).context("while calibrating")?;
            bar.inc(w.len() as u64);
        }
        if cal.tokens == 0 {
            return Err(no_tokens(&args.corpus.text));
        }
    }
    let mut loss = None;
    let mut budget_tokens = cal.tokens;
    if by_loss {
        let mut wins = Vec::new();
        let mut windows = TokenWindows::new(&files.tokenizer, &args.corpus.text, args.seq_len, args.budget_tokens)?;
        budget_tokens = 0;
        while let Some(w) = windows.next_window()? {
            budget_tokens += w.len() as u64;
            wins.push(w);
        }
        if budget_tokens == 0 {
            return Err(no_tokens(&args.corpus.text));
        }
        let mut keeps: Vec<usize> = args.budget_keeps.iter().map(|&f| ((f * c.ffn as f64).round() as usize).max(1)).collect();
        keeps.sort_unstable_by(|a, b| b.cmp(a));
        keeps.dedup();
        // A bar of its own: the forwards of the loss curves (after the token pass's bar, for teal).
        bar.finish_and_clear();
        bar = super::progress::bar((1 + c.layers * keeps.len()) as u64, "calibrate {msg} loss curves [{bar:30}] {pos}/{len} forwards eta {eta}");
        bar.set_message(args.rule.name());
        let (ffn, hidden) = (c.ffn, c.hidden);
        let rule = |l: usize, k: usize| match ranking {
            Ranking::QScore => MlpRule::QScoreTopK { k },
            Ranking::Exact => MlpRule::ExactDownTopK { k },
            Ranking::Teal => {
                let (t_in, t_hidden) = cal.teal_thresholds(l, 1.0 - k as f64 / ffn as f64);
                MlpRule::Teal { t_in, t_hidden }
            }
            Ranking::Wina => MlpRule::Wina { k_in: input_keep(k, ffn, hidden), k_hidden: k },
        };
        loss = Some(loss_curves(&model, &wins, rule, qscorer.as_ref(), &keeps, || bar.inc(1)).context("while measuring loss curves")?);
    }
    bar.finish_and_clear();
    let path = run.rules();
    let header = ArtifactHeader::new(RULES_FORMAT, RULES_VERSION, identity.clone(), &args);
    // Levels of the other rules (and other sparsities) already in the file stay; a file of another model or
    // format is an error rather than something to overwrite.
    let mut rules = if path.is_file() { RuleCalibration::load(&path, &identity)? } else { RuleCalibration::new(header.clone()) };
    rules.header = header;
    let step = if args.budget_step == 0 { (c.ffn / 64).max(1) } else { args.budget_step };
    let min_keep = (args.budget_min_keep * c.ffn as f64).ceil() as usize;
    println!("| rule | sparsity | per layer (first, median, last) | mean kept fraction |");
    println!("|---|---|---|---|");
    for &sp in &args.sparsity {
        if teal {
            let l = cal.teal_level(sp);
            let mut t = l.t_in.clone();
            t.sort_by(f32::total_cmp);
            println!("| teal | {sp} | t_in {:.4} / {:.4} / {:.4} | — |", l.t_in[0], t[t.len() / 2], l.t_in[l.t_in.len() - 1]);
            rules.put_teal(l);
        }
        let b = match &loss {
            Some(curves) => budget_from_curves(curves, ranking, sp, step, min_keep, budget_tokens, ERROR_LOSS),
            None => cal.budget_level(sp, step, min_keep),
        };
        let b = if teal { cal.with_teal_thresholds(b, c.ffn) } else { b };
        let mut k = b.k.clone();
        k.sort_unstable();
        let mean = b.k.iter().sum::<usize>() as f64 / (b.k.len() * c.ffn) as f64;
        println!("| {} budgets | {sp} | k {} / {} / {} | {mean:.4} |", b.ranking, b.k[0], k[k.len() / 2], b.k[b.k.len() - 1]);
        rules.put_budget(b);
    }
    rules.save(&path).context("while writing the rule calibration")?;
    let seen = match (cal.tokens, by_loss) {
        (0, _) => format!("loss curves on {budget_tokens} tokens"),
        (t, true) => format!("histograms on {t} tokens, loss curves on {budget_tokens}"),
        (t, false) => format!("{t} tokens"),
    };
    eprintln!("wrote {} ({seen}, {} layers)", path.display(), c.layers);
    Ok(())
}

/// The error of a calibration text that yields no tokens, naming the files.
fn no_tokens(text: &[PathBuf]) -> anyhow::Error {
    let text: Vec<String> = text.iter().map(|p| p.display().to_string()).collect();
    anyhow::anyhow!("{}: no tokens in the calibration text", text.join(", "))
}

impl ModelCommand for Args {
    fn run_on<B: Backend>(args: Self, files: ModelFiles, device: B::Device) -> anyhow::Result<()> {
        if let Some(max) = files.config.position_limit().filter(|&max| args.seq_len > max) {
            return Err(usage(format!("--seq-len: {} exceeds the model's max_position_embeddings {max}", args.seq_len)));
        }
        if args.rule != Rule::Cats {
            return run_rule::<B>(args, files, device);
        }
        let Some(out_path) = args.out.clone() else { return Err(usage("--rule cats: give --out FILE or --run RUN")) };
        // Inputs and the output are checked before any model work: a late failure would discard the whole run.
        let mut windows = TokenWindows::new(&files.tokenizer, &args.corpus.text, args.seq_len, args.tokens)?;
        super::common::check_output_file(&out_path)?;
        let identity = files.identity().context("while fingerprinting the model")?;
        let model = load_model::<B>(&files, &device, false)?;
        let mut cal = Calibrator::new(files.config.layers);
        // One bar over every pass (the first, then --refine passes per level), so its ETA is the command's.
        let passes = 1 + args.sparsity.len() * args.refine;
        let bar = super::progress::bar((args.tokens * passes) as u64, "calibrate {msg} [{bar:30}] {pos}/{len} tokens {per_sec} eta {eta}");
        bar.set_message(format!("pass 1/{passes}"));
        while let Some(w) = windows.next_window()? {
            cal.add_sequence(&model, &w).context("while calibrating")?;
            bar.inc(w.len() as u64);
        }
        // A text shorter than --tokens makes every pass shorter: the bar's length follows.
        bar.set_length(cal.tokens * passes as u64);
        let mut pass_no = 1;
        if cal.tokens == 0 {
            return Err(no_tokens(&args.corpus.text));
        }
        if (cal.tokens as usize) < args.tokens {
            eprintln!("note: the text provided {} tokens, fewer than --tokens {}; calibrated on what there is", cal.tokens, args.tokens);
        }
        let mut out = Thresholds {
            header: Thresholds::header(identity, &args),
            criterion: criterion(files.config.family).to_string(),
            tokens: cal.tokens,
            text: args.corpus.text.iter().map(|p| p.display().to_string()).collect(),
            levels: Vec::new(),
        };
        for &sp in &args.sparsity {
            let mut hists = cal.layers.clone();
            let mut thresholds: Vec<f32> = hists.iter().map(|h| h.quantile(sp)).collect();
            for pass in 0..args.refine {
                let plan = threshold_plan(&thresholds);
                let mut refined = Calibrator::new(files.config.layers);
                let mut windows = TokenWindows::new(&files.tokenizer, &args.corpus.text, args.seq_len, args.tokens)?;
                pass_no += 1;
                bar.set_message(format!("pass {pass_no}/{passes}: refine {sp} ({}/{})", pass + 1, args.refine));
                while let Some(w) = windows.next_window()? {
                    refined.add_sequence_under(&model, &w, Some(&plan)).context("while refining the thresholds")?;
                    bar.inc(w.len() as u64);
                }
                hists = refined.layers;
                thresholds = hists.iter().map(|h| h.quantile(sp)).collect();
            }
            let realised = hists.iter().zip(&thresholds).map(|(h, &t)| h.fraction_below(t)).collect();
            out.levels.push(ThresholdLevel { sparsity: sp, thresholds, realised });
            // Each finished level is on disk at once (atomically), so a late failure loses only the level it
            // happened in.
            out.save(&out_path).context("while writing the thresholds")?;
        }
        bar.finish_and_clear();
        println!("| sparsity | min threshold | median threshold | max threshold | realised (calibration text) |");
        println!("|---|---|---|---|---|");
        for l in &out.levels {
            let mut t = l.thresholds.clone();
            t.sort_by(f32::total_cmp);
            let mean_real = l.realised.iter().sum::<f64>() / l.realised.len() as f64;
            println!("| {:.2} | {:.4} | {:.4} | {:.4} | {:.4} |", l.sparsity, t[0], t[t.len() / 2], t[t.len() - 1], mean_real);
        }
        eprintln!("wrote {} ({} tokens, {} layers)", out_path.display(), out.tokens, files.config.layers);
        Ok(())
    }
}
