//! The SwiGLU rules (exact-down, quantized score, cascade, TEAL, WINA) and per-layer budgets: invariants on the
//! fixtures, with expected values from independent computations (a plain sort, hand arithmetic), and the CLI
//! path from `calibrate --rule` through `ppl` and `eval --compare`.

mod common;

use dejavu::backend::CpuBackend as B;
use dejavu::model::{to_host, to_host_3d, Forward, LayerTaps, QScorer, Sparse, TapSet};
use dejavu::sparse::quant::{QMatrix, QScheme, QScoreCopies, QuantOptions};
use dejavu::sparse::{HeadRule, LayerPlan, MlpRule, Plan, SparsityStats};
use dejavu::store::{ArtifactHeader, QSCORE_FORMAT, QSCORE_VERSION};
use dejavu::{Model, ModelFiles};

use common::{load_fixture_model as load, token_ids as ids};

/// Logits, per-layer taps and stats of one forward over `rows` under `plan` (dense when `None`).
fn run(
    model: &Model<B>,
    rows: &[Vec<u32>],
    plan: Option<&Plan>,
    q: Option<&QScorer<B>>,
    want: TapSet,
) -> (Vec<f32>, Vec<LayerTaps<B>>, SparsityStats) {
    let mut cache = model.new_cache();
    let mut taps = Vec::new();
    let mut stats = SparsityStats::new(model.cfg.layers);
    let sparse = plan.map(|p| Sparse::with_qscore(p, None, q).unwrap());
    let h = model.forward_with(
        model.tokens(rows),
        &mut cache,
        Forward { sparse, taps: Some((&want, &mut taps)), stats: Some(&mut stats), ..Default::default() },
    );
    (to_host_3d(model.logits(h)).0, taps, stats)
}

fn int4(files: &ModelFiles, model: &Model<B>) -> QScoreCopies {
    let header = ArtifactHeader::new(QSCORE_FORMAT, QSCORE_VERSION, files.identity().unwrap(), &());
    dejavu::calibrate::quantize_model(model, QuantOptions { bits: 4, group: 32, scheme: QScheme::Sym }, header).unwrap()
}

fn max_rel_diff(a: &[f32], b: &[f32]) -> f32 {
    let scale = b.iter().fold(0f32, |m, v| m.max(v.abs())).max(1e-6);
    a.iter().zip(b).fold(0f32, |m, (x, y)| m.max((x - y).abs())) / scale
}

const LLAMAS: [&str; 2] = ["tiny-llama", "tiny-llama-tied"];

#[test]
fn every_rule_at_keep_all_equals_dense() {
    for name in LLAMAS {
        let (files, model) = load(name);
        let c = &files.config;
        let rows = vec![ids(12, 1), ids(12, 2)];
        let (dense, _, _) = run(&model, &rows, None, None, TapSet::default());
        let copies = int4(&files, &model);
        let q4 = QScorer::<B>::from_copies(&copies, &Default::default());
        let rules = [
            MlpRule::ExactDownTopK { k: c.ffn },
            MlpRule::QScoreTopK { k: c.ffn },
            MlpRule::Cascade { candidates: c.ffn, k: c.ffn },
            MlpRule::Teal { t_in: 0.0, t_hidden: 0.0 },
            MlpRule::Wina { k_in: c.hidden, k_hidden: c.ffn },
        ];
        for rule in rules {
            let plan = Plan::uniform(c.layers, LayerPlan { mlp: rule, heads: HeadRule::Dense });
            let (got, taps, stats) = run(&model, &rows, Some(&plan), Some(&q4), TapSet { mlp_keep: true, ..Default::default() });
            // The gathered host computation sums in another order than the dense matmul: f32 rounding only.
            let d = max_rel_diff(&got, &dense);
            assert!(d < 1e-5, "{name}: {rule:?} differs from dense by {d}");
            for t in taps {
                assert!(to_host(t.mlp_keep.unwrap()).iter().all(|&k| k == 1.0), "{name}: {rule:?} dropped a neuron");
            }
            assert_eq!(stats.mlp_plan_sparsity(), 0.0, "{name}: {rule:?}");
        }
    }
}

/// The `k` largest of `v` (ties by the lower index), by a plain stable sort: independent of `select::top_k`.
fn sorted_top_k(v: &[f32], k: usize) -> Vec<usize> {
    let mut order: Vec<usize> = (0..v.len()).collect();
    order.sort_by(|&a, &b| v[b].partial_cmp(&v[a]).unwrap());
    let mut top = order[..k].to_vec();
    top.sort_unstable();
    top
}

fn kept_rows(mask: &[f32], f: usize) -> Vec<Vec<usize>> {
    mask.chunks(f).map(|r| (0..f).filter(|&j| r[j] == 1.0).collect()).collect()
}

#[test]
fn exact_scores_select_the_oracle_set() {
    for name in LLAMAS {
        let (files, model) = load(name);
        let c = &files.config;
        let f = c.ffn;
        let rows = vec![ids(16, 3)];
        let exact = QScorer::<B>::exact(&model);
        let want = TapSet { mlp_keep: true, mlp_act: true, ..Default::default() };
        // Layer 0 sees the same input in every mode: its true top-k by |SiLU(gate)·up| from the dense forward.
        let (_, dense_taps, _) = run(&model, &rows, None, None, want);
        let act0 = to_host(dense_taps[0].mlp_act.clone().unwrap());
        for k in [1, f / 3, f / 2, f - 1] {
            let want_l0: Vec<Vec<usize>> = act0.chunks(f).map(|r| sorted_top_k(&r.iter().map(|v| v.abs()).collect::<Vec<_>>(), k)).collect();
            let oracle = Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::OracleTopK { k }, heads: HeadRule::Dense });
            let (o_logits, o_taps, _) = run(&model, &rows, Some(&oracle), None, want);
            for rule in [MlpRule::QScoreTopK { k }, MlpRule::Cascade { candidates: (k + 5).min(f), k }, MlpRule::ExactDownTopK { k }] {
                let plan = Plan::uniform(c.layers, LayerPlan { mlp: rule, heads: HeadRule::Dense });
                let (logits, taps, _) = run(&model, &rows, Some(&plan), Some(&exact), want);
                let l0 = kept_rows(&to_host(taps[0].mlp_keep.clone().unwrap()), f);
                assert_eq!(l0, want_l0, "{name} k={k}: {rule:?} layer 0");
                for (l, (t, o)) in taps.iter().zip(&o_taps).enumerate() {
                    let a = kept_rows(&to_host(t.mlp_keep.clone().unwrap()), f);
                    let b = kept_rows(&to_host(o.mlp_keep.clone().unwrap()), f);
                    assert_eq!(a, b, "{name} k={k}: {rule:?} layer {l} differs from the oracle");
                }
                let d = max_rel_diff(&logits, &o_logits);
                assert!(d < 1e-5, "{name} k={k}: {rule:?} logits differ from the oracle's by {d}");
            }
        }
    }
}

#[test]
fn bytes_read_follow_from_what_each_rule_touches() {
    let (files, model) = load("tiny-llama");
    let c = &files.config;
    let (f, d) = (c.ffn as f64, c.hidden as f64);
    let rows = vec![ids(10, 4)];
    let copies = int4(&files, &model);
    let q4 = QScorer::<B>::from_copies(&copies, &Default::default());
    let k = c.ffn / 2;
    let kf = k as f64 / f;
    // By hand: gate/up/down are three equal matrices; an int4 copy with an f16 scale per 32 reads 4.5/16 of one.
    let cases = [
        (MlpRule::ExactDownTopK { k }, (2.0 + kf) / 3.0),
        (MlpRule::QScoreTopK { k }, (2.0 * 4.5 / 16.0 + 3.0 * kf) / 3.0),
        (MlpRule::Cascade { candidates: 2 * k, k }, (2.0 * 4.5 / 16.0 + 2.0 * (2.0 * kf) + kf) / 3.0),
        (MlpRule::OracleTopK { k }, (2.0 + kf) / 3.0),
        (MlpRule::Wina { k_in: c.hidden / 4, k_hidden: k }, (2.0 * 0.25 * f * d + k as f64 * d) / (3.0 * f * d)),
    ];
    for (rule, want) in cases {
        let plan = Plan::uniform(c.layers, LayerPlan { mlp: rule, heads: HeadRule::Dense });
        let (_, _, stats) = run(&model, &rows, Some(&plan), Some(&q4), TapSet::default());
        let got = stats.mlp_read_fraction();
        assert!((got - want).abs() < 1e-12, "{rule:?}: read {got}, expected {want}");
        assert!((stats.mlp_plan_sparsity() - (1.0 - kf)).abs() < 1e-12, "{rule:?}: {}", stats.mlp_plan_sparsity());
    }
    // TEAL: reads follow the realised counts; with thresholds above every value nothing is read.
    let plan = Plan::uniform(c.layers, LayerPlan { mlp: MlpRule::Teal { t_in: f32::MAX, t_hidden: f32::MAX }, heads: HeadRule::Dense });
    let (_, _, stats) = run(&model, &rows, Some(&plan), None, TapSet::default());
    assert_eq!(stats.mlp_read_fraction(), 0.0);
    assert_eq!(stats.mlp_plan_sparsity(), 1.0);
}

#[test]
fn loss_curves_measure_one_layer_at_a_time() {
    let (files, model) = load("tiny-llama");
    let c = &files.config;
    let wins = vec![ids(24, 5), ids(24, 6)];
    let keeps = [c.ffn / 2, c.ffn / 8];
    let rule = |_, k| MlpRule::ExactDownTopK { k };
    let curves = dejavu::calibrate::loss_curves(&model, &wins, rule, None, &keeps, || {}).unwrap();
    assert_eq!(curves.len(), c.layers);
    // Recomputed here from the logits, with a softmax written out: KL(dense ‖ layer 1 alone at ffn/2).
    let probs = |plan: Option<&Plan>| -> Vec<Vec<f64>> {
        let mut rows = Vec::new();
        for w in &wins {
            let (logits, _, _) = run(&model, std::slice::from_ref(w), plan, None, TapSet::default());
            for r in logits.chunks(c.vocab_size) {
                let m = r.iter().fold(f32::NEG_INFINITY, |m, &x| m.max(x)) as f64;
                let z: f64 = r.iter().map(|&x| (x as f64 - m).exp()).sum();
                rows.push(r.iter().map(|&x| (x as f64 - m).exp() / z).collect());
            }
        }
        rows
    };
    let mut plan = Plan::dense(c.layers);
    plan.layers[1].mlp = rule(1, c.ffn / 2);
    let (p, q) = (probs(None), probs(Some(&plan)));
    let kl: f64 = p.iter().zip(&q).map(|(p, q)| p.iter().zip(q).map(|(a, b)| a * (a / b).ln()).sum::<f64>()).sum::<f64>() / p.len() as f64;
    assert!(kl > 0.0);
    // Made non-increasing in k, a point can only be lifted to what lies above it (here the segment to 0 at ffn).
    let got = curves[1][c.ffn / 2];
    assert!((got - kl).abs() < 1e-4 * kl.max(1e-3), "{got} vs {kl}");
    for curve in &curves {
        assert_eq!(curve.len(), c.ffn + 1);
        assert_eq!(curve[c.ffn], 0.0);
        assert!(curve.windows(2).all(|w| w[0] >= w[1]), "{curve:?}");
    }
}

#[test]
fn score_copies_round_trip_and_refuse_another_model() {
    let (files, model) = load("tiny-llama");
    let copies = int4(&files, &model);
    let tmp = tempfile::tempdir().unwrap();
    let path = tmp.path().join("qscore.safetensors");
    copies.save(&path).unwrap();
    let back = QScoreCopies::load(&path, &files.identity().unwrap()).unwrap();
    assert_eq!(back.opts, copies.opts);
    for ((g, u), (g2, u2)) in copies.layers.iter().zip(&back.layers) {
        assert_eq!(g, g2);
        assert_eq!(u, u2);
    }
    // Each dequantized weight lies within half a step of the model's (the quantizer's defining bound).
    let h = &model.host_mlps()[0];
    let (g, _) = &copies.layers[0];
    let deq = g.dequantize();
    for (i, (&w, &v)) in h.gate_rows().iter().zip(&deq).enumerate() {
        let s = g.scale[i / g.cols * g.groups() + (i % g.cols) / 32];
        assert!((w - v).abs() <= 0.5 * s + 1e-3 * (1.0 + w.abs()), "weight {i}: {w} vs {v}");
    }
    let other = ModelFiles::resolve(common::fixture_dir("tiny-llama-tied").to_str().unwrap()).unwrap();
    let e = QScoreCopies::load(&path, &other.identity().unwrap()).unwrap_err().to_string();
    assert!(e.contains("qscore.safetensors") && e.contains("fingerprint"), "{e}");
    let _: Option<QMatrix> = None;
}

fn cli_ok(args: &[&str]) -> common::Output {
    let out = common::dejavu(args, &[]);
    assert_eq!(out.code, 0, "{args:?}: {}", out.stderr);
    assert!(!out.stderr.contains("panicked"));
    out
}

#[test]
fn calibrate_rules_then_ppl_and_eval_compare() {
    let tmp = tempfile::tempdir().unwrap();
    let run_dir = tmp.path().join("run");
    let rd = run_dir.to_str().unwrap();
    let model = common::fixture_dir("tiny-llama");
    let m = model.to_str().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "the cat sat on the mat and looked at the dog. ".repeat(40)).unwrap();
    let t = text.to_str().unwrap();
    let base = ["calibrate", "--model", m, "--text", t, "--tokens", "512", "--seq-len", "64", "--run", rd];
    cli_ok(&[&base[..], &["--rule", "qscore", "--sparsity", "0.5,0.7"]].concat());
    cli_ok(&[&base[..], &["--rule", "exactdown", "--sparsity", "0.5,0.7", "--budget-error", "proxy"]].concat());
    cli_ok(&[&base[..], &["--rule", "teal", "--sparsity", "0.5"]].concat());
    cli_ok(&[&base[..], &["--rule", "wina", "--sparsity", "0.5,0.7"]].concat());
    assert!(run_dir.join("qscore.safetensors").is_file());
    let rules: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("rules.json")).unwrap()).unwrap();
    assert_eq!(rules["header"]["format"], "dejavu.rules");
    // Later rules kept what earlier ones wrote: budgets of the qscore, exact and wina rankings at both levels,
    // TEAL's budgets and uniform thresholds at 0.5.
    let budgets = rules["budgets"].as_array().unwrap();
    let rankings: Vec<&str> = budgets.iter().map(|b| b["ranking"].as_str().unwrap()).collect();
    assert_eq!(rankings, ["exact", "exact", "qscore", "qscore", "teal", "wina", "wina"], "{rules}");
    let objectives: Vec<&str> = budgets.iter().map(|b| b["objective"].as_str().unwrap()).collect();
    assert!(objectives.iter().any(|o| o.starts_with("mean KL(dense || sparse)")), "{objectives:?}");
    assert!(objectives.iter().any(|o| o.starts_with("sum over calibration tokens")), "{objectives:?}");
    let (ffn, layers) = (48.0, 2.0);
    for b in budgets {
        let s = b["sparsity"].as_f64().unwrap();
        let kept: f64 = b["k"].as_array().unwrap().iter().map(|k| k.as_f64().unwrap()).sum();
        let realised = 1.0 - kept / (ffn * layers);
        assert!((realised - s).abs() <= 0.005, "{b}: budgets realise {realised}, asked {s}");
    }
    assert_eq!(rules["teal"][0]["t_in"].as_array().unwrap().len(), 2);
    // TEAL's budgets carry each layer's thresholds; the other rankings none.
    for b in budgets {
        let n = if b["ranking"] == "teal" { 2 } else { 0 };
        assert_eq!(b.get("t_in").and_then(|t| t.as_array()).map_or(0, |t| t.len()), n, "{b}");
        assert_eq!(b.get("t_hidden").and_then(|t| t.as_array()).map_or(0, |t| t.len()), n, "{b}");
    }
    // ppl runs every new mode and reports its bytes.
    let ppl = |mode: &str| {
        let out = cli_ok(&["ppl", "--model", m, "--text", t, "--max-tokens", "96", "--ctx", "48", "--mode", mode,
            "--rules", run_dir.join("rules.json").to_str().unwrap(), "--qscore", run_dir.join("qscore.safetensors").to_str().unwrap()]);
        assert!(out.stdout.contains("MLP bytes read"), "{}", out.stdout);
        out
    };
    for mode in [
        "qscore@0.5", "qscore@0.7+greedy", "exactdown@0.5+greedy", "cascade@0.7", "cascade@0.5+greedy", "teal@0.5", "teal@0.5+greedy",
        "wina@0.5", "wina@0.7+greedy",
    ] {
        ppl(mode);
    }
    // eval --compare takes the new modes and finds the artifacts through --run.
    let tasks_dir = common::shared_dir().join("data/tasks");
    let out = cli_ok(&["eval", "--model", m, "--tasks-dir", tasks_dir.to_str().unwrap(), "--tasks", "copa", "--limit", "4",
        "--compare", "dense,qscore@0.5,exactdown@0.5+greedy,teal@0.5,wina@0.5", "--run", rd]);
    assert!(out.stdout.contains("| qscore@0.5 | copa | 4 |"), "{}", out.stdout);
    let csv = std::fs::read_to_string(run_dir.join("eval/results.csv")).unwrap();
    assert!(csv.lines().next().unwrap().ends_with(",mlp_read_fraction"), "{csv}");
    let res: serde_json::Value = serde_json::from_str(&std::fs::read_to_string(run_dir.join("eval/results.json")).unwrap()).unwrap();
    assert_eq!(res["modes"][0]["mlp_read_fraction"].as_f64(), Some(1.0));
    // exactdown@0.5+greedy reads all of gate/up and half of down's rows in total: (2 + 0.5)/3 up to rounding.
    let ed = res["modes"][2]["mlp_read_fraction"].as_f64().unwrap();
    assert!((ed - 2.5 / 3.0).abs() < 0.005, "exactdown read {ed}");
}

#[test]
fn rule_cli_bad_inputs_exit_2_naming_the_flag() {
    let tmp = tempfile::tempdir().unwrap();
    let model = common::fixture_dir("tiny-llama");
    let m = model.to_str().unwrap();
    let text = tmp.path().join("t.txt");
    std::fs::write(&text, "a b c d e f g. ".repeat(20)).unwrap();
    let t = text.to_str().unwrap();
    let check = |args: &[&str], code: i32, needles: &[&str]| {
        let out = common::dejavu(args, &[]);
        assert_eq!(out.code, code, "{args:?}: {}", out.stderr);
        assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
        for n in needles {
            assert!(out.stderr.contains(n), "`{n}` missing from {}", out.stderr);
        }
    };
    let ppl = ["ppl", "--model", m, "--text", t, "--max-tokens", "32", "--ctx", "16"];
    check(&[&ppl[..], &["--mode", "qscore@0.5"]].concat(), 2, &["--qscore", "calibrate --rule qscore"]);
    check(&[&ppl[..], &["--mode", "teal@0.5"]].concat(), 2, &["--rules", "calibrate --rule teal"]);
    check(&[&ppl[..], &["--mode", "cats@0.5+greedy"]].concat(), 2, &["--mode", "+greedy"]);
    check(&[&ppl[..], &["--mode", "wina@0.5+greedy"]].concat(), 2, &["--rules", "calibrate --rule wina"]);
    check(&[&ppl[..], &["--mode", "wina@0.5", "--head-sparsity", "0.5"]].concat(), 2, &["--predictors"]);
    let opt = common::fixture_dir("tiny-opt");
    check(&["ppl", "--model", opt.to_str().unwrap(), "--text", t, "--ctx", "16", "--mode", "exactdown@0.5"], 2, &["--mode", "SwiGLU"]);
    check(&["calibrate", "--model", m, "--text", t, "--rule", "qscore"], 2, &["--run"]);
    check(&["calibrate", "--model", m, "--text", t, "--rule", "teal", "--run", tmp.path().join("r").to_str().unwrap()], 2, &["--sparsity"]);
    check(&["calibrate", "--model", m, "--text", t, "--rule", "wina", "--run", tmp.path().join("r").to_str().unwrap()], 2, &["--sparsity"]);
    check(
        &["calibrate", "--model", m, "--text", t, "--rule", "wina", "--sparsity", "0.5", "--budget-error", "proxy", "--run", tmp.path().join("r").to_str().unwrap()],
        2,
        &["--budget-error"],
    );
    check(&["calibrate", "--model", m, "--text", t, "--rule", "qscore", "--qbits", "9", "--run", tmp.path().join("r").to_str().unwrap()], 2, &["--qbits"]);
    check(
        &["calibrate", "--model", m, "--text", t, "--rule", "exactdown", "--sparsity", "0.5", "--budget-keeps", "0.5,1.5", "--run", tmp.path().join("r").to_str().unwrap()],
        2,
        &["--budget-keeps"],
    );
    // A rules file that is not one: exit 1 naming the file.
    let bad = tmp.path().join("rules.json");
    std::fs::write(&bad, "{\"teal\": []}").unwrap();
    check(&[&ppl[..], &["--mode", "teal@0.5", "--rules", bad.to_str().unwrap()]].concat(), 1, &["rules.json", "header"]);
}

#[test]
fn input_sparse_budgets_resolve_per_layer() {
    use dejavu::sparse::calib::{BudgetLevel, Ranking, RuleCalibration, TealLevel};
    use dejavu::sparse::{resolve, Artifacts, Mode, PlanOptions};
    let (files, _) = load("tiny-llama");
    let c = &files.config;
    let (f, d) = (c.ffn, c.hidden);
    let header = ArtifactHeader::new(dejavu::store::RULES_FORMAT, dejavu::store::RULES_VERSION, files.identity().unwrap(), &());
    let mut rules = RuleCalibration::new(header);
    // Two layers: the budget keeps 3/4 of layer 0 and 1/4 of layer 1 (mean 1/2).
    let k = vec![3 * f / 4, f / 4];
    let level = |ranking, t: Vec<f32>| BudgetLevel {
        ranking,
        sparsity: 0.5,
        k: k.clone(),
        error: vec![0.0; 2],
        tokens: 1,
        objective: String::new(),
        t_in: t.clone(),
        t_hidden: t.iter().map(|x| x * 10.0).collect(),
    };
    rules.put_budget(level(Ranking::Wina, vec![]));
    rules.put_budget(level(Ranking::Teal, vec![0.25, 0.75]));
    rules.put_teal(TealLevel { sparsity: 0.5, t_in: vec![1.0, 1.0], t_hidden: vec![2.0, 2.0], tokens: 1 });
    let path = std::path::Path::new("rules.json");
    let art = Artifacts { calibration: Some((path, &rules)), ..Default::default() };
    let plan = |m: &str| resolve(m.parse::<Mode>().unwrap(), &PlanOptions::default(), c, &art);
    let wina = plan("wina@0.5+greedy").unwrap();
    for (l, &kl) in k.iter().enumerate() {
        // Input channels follow the layer's kept fraction of neurons (hand arithmetic: round(k·d/f)).
        let want_in = ((kl * d) as f64 / f as f64).round() as usize;
        assert_eq!(wina.layers[l].mlp, MlpRule::Wina { k_in: want_in, k_hidden: kl });
    }
    assert_eq!(plan("wina@0.5").unwrap().layers[1].mlp, MlpRule::Wina { k_in: d / 2, k_hidden: f / 2 });
    let teal = plan("teal@0.5+greedy").unwrap();
    assert_eq!(teal.layers[0].mlp, MlpRule::Teal { t_in: 0.25, t_hidden: 2.5 });
    assert_eq!(teal.layers[1].mlp, MlpRule::Teal { t_in: 0.75, t_hidden: 7.5 });
    assert_eq!(plan("teal@0.5").unwrap().layers[1].mlp, MlpRule::Teal { t_in: 1.0, t_hidden: 2.0 });
    // A level that is not there names the file and what it has.
    let e = plan("wina@0.7+greedy").unwrap_err().to_string();
    assert!(e.contains("rules.json") && e.contains("no wina budgets for sparsity 0.7") && e.contains("has 0.5"), "{e}");
    // On disk: teal budgets without their per-layer thresholds are refused naming the file and the field.
    let tmp = tempfile::tempdir().unwrap();
    let file = tmp.path().join("rules.json");
    rules.put_budget(level(Ranking::Teal, vec![]));
    rules.save(&file).unwrap();
    let e = RuleCalibration::load(&file, &files.identity().unwrap()).unwrap_err().to_string();
    assert!(e.contains("rules.json") && e.contains("budgets[teal sparsity=0.5].t_in"), "{e}");
}
