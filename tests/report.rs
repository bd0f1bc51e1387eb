//! `dejavu report`: the page's numbers equal the run's CSV/JSON files. The expected cells are formatted here from
//! the values this test wrote (or read back from a real eval's results.csv), and the means and differences are
//! recomputed here, independently of the report code.

mod common;

use std::path::Path;

/// The cells of every body row of the HTML table with `id`, tags stripped and entities decoded.
fn table_rows(html: &str, id: &str) -> Vec<Vec<String>> {
    let start = html.find(&format!("<table id=\"{id}\">")).unwrap_or_else(|| panic!("no table `{id}` in the page"));
    let end = start + html[start..].find("</table>").expect("unterminated table");
    let body = &html[start..end];
    let body = &body[body.find("<tbody>").expect("tbody")..];
    body.split("<tr>")
        .skip(1)
        .map(|row| {
            row.split("<td>")
                .skip(1)
                .map(|c| {
                    c.split("</td>").next().unwrap_or("").replace("&lt;", "<").replace("&gt;", ">").replace("&quot;", "\"").replace("&amp;", "&")
                })
                .collect()
        })
        .collect()
}

fn write(path: &Path, text: &str) {
    std::fs::create_dir_all(path.parent().unwrap()).unwrap();
    std::fs::write(path, text).unwrap();
}

struct Task {
    mode: &'static str,
    task: &'static str,
    n: u32,
    acc: f64,
    se: f64,
    norm: Option<f64>,
    mlp: f64,
    head: f64,
}

const TASKS: [Task; 6] = [
    Task { mode: "dense", task: "copa", n: 200, acc: 0.635, se: 0.0341, norm: Some(0.61), mlp: 0.0, head: 0.0 },
    Task { mode: "dense", task: "piqa", n: 200, acc: 0.66, se: 0.0335, norm: Some(0.655), mlp: 0.0, head: 0.0 },
    Task { mode: "oracle@0.5", task: "copa", n: 200, acc: 0.62, se: 0.0344, norm: Some(0.6), mlp: 0.5, head: 0.0 },
    Task { mode: "oracle@0.5", task: "piqa", n: 200, acc: 0.645, se: 0.0338, norm: None, mlp: 0.5, head: 0.0 },
    Task { mode: "cats@0.5", task: "copa", n: 200, acc: 0.55, se: 0.0352, norm: Some(0.53), mlp: 0.4812, head: 0.0 },
    Task { mode: "cats@0.5", task: "piqa", n: 200, acc: 0.6, se: 0.0346, norm: Some(0.59), mlp: 0.4977, head: 0.0 },
];
const PPL: [(&str, f64, f64); 3] = [("dense", 28.8198, 0.0), ("oracle@0.5", 30.0311, 0.5), ("cats@0.5", 39.2, 0.4901)];

fn synthetic_run(root: &Path) {
    let mut csv = String::from("mode,task,n,acc,acc_stderr,acc_norm,acc_norm_stderr,ppl,mlp_sparsity,head_sparsity,examples_per_s\n");
    for t in &TASKS {
        let norm = t.norm.map(|v| v.to_string()).unwrap_or_default();
        csv += &format!("{},{},{},{},{},{},,,{},{},1.5\n", t.mode, t.task, t.n, t.acc, t.se, norm, t.mlp, t.head);
    }
    for (m, p, s) in PPL {
        csv += &format!("{m},ppl,2048,,,,,{p},{s},,\n");
    }
    write(&root.join("eval/results.csv"), &csv);
    write(&root.join("eval/results.json"), "{\"model\": \"synthetic-model <test>\", \"modes\": []}\n");
    let mut layers = String::from("mode,layer,mlp_sparsity,mlp_plan_sparsity,mlp_natural_sparsity,mlp_token_min,mlp_token_max,head_sparsity\n");
    for l in 0..4 {
        layers += &format!("dense,{l},0,0,0,0,0,0\noracle@0.5,{l},0.5,0.5,0,0.5,0.5,0\ncats@0.5,{l},{},{},0,0.3,0.7,0\n", 0.45 + 0.01 * l as f64, 0.45 + 0.01 * l as f64);
    }
    write(&root.join("eval/layers.csv"), &layers);
    write(
        &root.join("predictors/metrics.csv"),
        "layer,k_neurons,ffn,neuron_density,neuron_recall,head_recall,head_density\n0,64,128,0.5,0.91,0.8,0.5\n1,64,128,0.5,0.88,0.75,0.5\n2,64,128,0.5,0.86,0.7,0.5\n3,64,128,0.5,0.9,0.72,0.5\n",
    );
    write(
        &root.join("bench.json"),
        r#"[{"engine":"dejavu-cuda","model":"llama2-7b","dtype":"f16","batch":1,"median_ms":4.703,"floor_ms":3.14,"ratio_to_floor":1.4977,"tokens_per_s":212.6},
           {"engine":"dejavu-cuda","model":"smollm2-135m","dtype":"f16","batch":1,"median_ms":0.722,"floor_ms":0.063,"ratio_to_floor":11.46,"tokens_per_s":1385.0}]"#,
    );
}

#[test]
fn report_numbers_equal_the_run_files() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    synthetic_run(&run);
    let out = common::dejavu(&["report", run.to_str().unwrap(), "--print"], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let dir = run.join("report");
    for f in ["index.html", "summary.md", "accuracy_vs_sparsity.svg", "ppl_vs_sparsity.svg", "layers.svg", "latency.svg"] {
        assert!(dir.join(f).is_file(), "{f} missing; stderr: {}", out.stderr);
    }
    assert!(!dir.join("bytes.svg").exists(), "no mlp_read_fraction column, so no bytes chart");
    let html = std::fs::read_to_string(dir.join("index.html")).unwrap();
    assert!(html.contains("synthetic-model &lt;test&gt;"), "the model name from results.json, escaped");

    // Per task: every results.csv task row, in order, at the page's precision.
    let rows = table_rows(&html, "tasks");
    assert_eq!(rows.len(), TASKS.len());
    for (r, t) in rows.iter().zip(&TASKS) {
        let want = vec![
            t.mode.to_string(),
            t.task.to_string(),
            t.n.to_string(),
            format!("{:.4}", t.acc),
            format!("{:.4}", t.se),
            t.norm.map_or("—".to_string(), |v| format!("{v:.4}")),
            format!("{:.3}", t.mlp),
            format!("{:.3}", t.head),
        ];
        assert_eq!(r, &want);
    }

    // Per mode: means over the tasks and differences against dense, recomputed here.
    let modes = table_rows(&html, "modes");
    assert_eq!(modes.len(), 3);
    fn of(m: &str) -> impl Iterator<Item = &'static Task> + '_ {
        TASKS.iter().filter(move |t| t.mode == m)
    }
    let mean_acc = |m: &str| of(m).map(|t| t.acc).sum::<f64>() / 2.0;
    let se = |m: &str| of(m).map(|t| t.se * t.se).sum::<f64>().sqrt() / 2.0;
    for (row, (m, ppl, _)) in modes.iter().zip(PPL) {
        assert_eq!(row[0], m);
        assert_eq!(row[1], "2");
        assert_eq!(row[2], format!("{:.4} ± {:.4}", mean_acc(m), se(m)));
        let d = 100.0 * (mean_acc(m) - mean_acc("dense"));
        let dse = 100.0 * (se(m).powi(2) + se("dense").powi(2)).sqrt();
        assert_eq!(row[3], format!("{d:+.2} ± {dse:.2}"));
        assert_eq!(row[4], format!("{ppl:.4}"));
        assert_eq!(row[5], format!("{:+.2}%", 100.0 * (ppl / 28.8198 - 1.0)));
        assert_eq!(row[6], format!("{:.3}", of(m).map(|t| t.mlp).sum::<f64>() / 2.0));
        assert_eq!(row[8], "—");
    }

    // Bench rows as written.
    let bench = table_rows(&html, "bench");
    assert_eq!(bench.len(), 2);
    assert_eq!(bench[0], ["llama2-7b", "f16", "1", "dense", "4.703", "3.140", "1.50", "212.6"]);
    assert_eq!(bench[1], ["smollm2-135m", "f16", "1", "dense", "0.722", "0.063", "11.46", "1385.0"]);

    // The markdown summary carries the same mode rows (printed with --print too).
    let md = std::fs::read_to_string(dir.join("summary.md")).unwrap();
    let dense_line = format!("| dense | 2 | {:.4} ± {:.4} | +0.00 ± {:.2} | 28.8198 | +0.00% |", mean_acc("dense"), se("dense"), 100.0 * (se("dense").powi(2) + se("dense").powi(2)).sqrt());
    assert!(md.contains(&dense_line), "{dense_line}\n{md}");
    assert!(out.stdout.contains(&dense_line));

    // The layer chart draws one polyline per sparse mode and per predictor series (dense is all zeros: left out).
    let layers_svg = std::fs::read_to_string(dir.join("layers.svg")).unwrap();
    assert_eq!(layers_svg.matches("<polyline").count(), 2 + 3);
}

#[test]
fn report_of_a_real_eval() {
    let tmp = tempfile::tempdir().unwrap();
    let run = tmp.path().join("run");
    let model = common::fixture_dir("tiny-opt");
    let tasks = common::shared_dir().join("data/tasks");
    let out = common::dejavu(
        &["eval", "--model", model.to_str().unwrap(), "--tasks-dir", tasks.to_str().unwrap(), "--tasks", "copa,piqa", "--limit", "4",
          "--compare", "dense,oracle@0.5", "--out", run.join("eval").to_str().unwrap()],
        &[],
    );
    assert_eq!(out.code, 0, "{}", out.stderr);
    let out = common::dejavu(&["report", run.to_str().unwrap()], &[]);
    assert_eq!(out.code, 0, "{}", out.stderr);
    let html = std::fs::read_to_string(run.join("report/index.html")).unwrap();
    let rows = table_rows(&html, "tasks");
    let mut rd = csv::Reader::from_path(run.join("eval/results.csv")).unwrap();
    let hdr = rd.headers().unwrap().clone();
    let col = |name: &str| hdr.iter().position(|h| h == name).unwrap();
    let recs: Vec<csv::StringRecord> = rd.records().map(|r| r.unwrap()).filter(|r| &r[col("task")] != "ppl").collect();
    assert_eq!(rows.len(), recs.len());
    assert_eq!(recs.len(), 4);
    // The modes table's MLP bytes read: the mean of the mode's task rows of `mlp_read_fraction`, recomputed here.
    let modes = table_rows(&html, "modes");
    for m in ["dense", "oracle@0.5"] {
        let v: Vec<f64> = recs.iter().filter(|r| &r[col("mode")] == m).map(|r| r[col("mlp_read_fraction")].parse::<f64>().unwrap()).collect();
        let row = modes.iter().find(|r| r[0] == m).unwrap();
        assert_eq!(row[8], format!("{:.3}", v.iter().sum::<f64>() / v.len() as f64));
    }
    assert!(run.join("report/bytes.svg").is_file(), "the eval recorded mlp_read_fraction, so the bytes chart is drawn");
    for (row, rec) in rows.iter().zip(&recs) {
        let num = |c: &str, d: usize| rec[col(c)].parse::<f64>().map(|v| format!("{v:.d$}")).unwrap_or_else(|_| "—".into());
        assert_eq!(row[0], &rec[col("mode")]);
        assert_eq!(row[1], &rec[col("task")]);
        assert_eq!(row[2], &rec[col("n")]);
        assert_eq!(row[3], num("acc", 4));
        assert_eq!(row[5], num("acc_norm", 4));
        assert_eq!(row[6], num("mlp_sparsity", 3));
    }
}

#[test]
fn report_errors_name_the_file_and_field() {
    let tmp = tempfile::tempdir().unwrap();
    // Nothing to report.
    let empty = tmp.path().join("empty");
    std::fs::create_dir_all(&empty).unwrap();
    let out = common::dejavu(&["report", empty.to_str().unwrap()], &[]);
    assert_eq!(out.code, 1, "{}", out.stderr);
    assert!(out.stderr.contains("nothing to report"), "{}", out.stderr);
    // A missing run directory.
    let out = common::dejavu(&["report", tmp.path().join("nope").to_str().unwrap()], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("no such run directory"), "{}", out.stderr);
    // A malformed number: the file, the line and the column.
    let bad = tmp.path().join("bad");
    write(&bad.join("eval/results.csv"), "mode,task,n,acc,acc_stderr\ndense,copa,200,0.6,0.03\ndense,piqa,200,abc,0.03\n");
    let out = common::dejavu(&["report", bad.to_str().unwrap()], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("results.csv") && out.stderr.contains("line 3") && out.stderr.contains("`acc`"), "{}", out.stderr);
    assert!(!out.stderr.contains("panicked"), "{}", out.stderr);
    // A bench file that is not an array of results.
    let badb = tmp.path().join("badb");
    write(&badb.join("bench.json"), "{\"model\": 1}");
    let out = common::dejavu(&["report", badb.to_str().unwrap()], &[]);
    assert_eq!(out.code, 1);
    assert!(out.stderr.contains("bench.json") && out.stderr.contains("array"), "{}", out.stderr);
}
