//! `dejavu inspect`: what a model source holds (config summary, dtype mix, tensor table) and, with `--read`,
//! how fast its raw bytes stream off disk the way the GPU uploader will read them.

use std::fmt::Write as _;
use std::io::Write as _;
use std::path::PathBuf;

use anyhow::Context;

use dejavu::store::human_bytes;
use dejavu::source::inventory::{read_all, Inventory, ReadStats};

use super::common::resolve;

#[derive(Debug, Clone, clap::Args, serde::Serialize, serde::Deserialize)]
pub struct Args {
    /// Model: a Hugging Face directory, a GGUF file, or a Hub id (as for every other subcommand).
    #[arg(long, short = 'm')]
    pub model: String,
    /// Stream every tensor's bytes through the raw path (borrow, checksum, drop) and report GB/s.
    #[arg(long)]
    pub read: bool,
    /// Write the summary, the tensor table (and the read statistics) as JSON to this file.
    #[arg(long)]
    pub json: Option<PathBuf>,
}

#[derive(serde::Serialize)]
struct Report<'a> {
    model: &'a str,
    #[serde(flatten)]
    inventory: &'a Inventory,
    read: Option<&'a ReadStats>,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let files = resolve(&args.model)?;
    let inv = Inventory::new(&files.config, files.checkpoint.as_ref())
        .with_context(|| format!("while listing the tensors of `{}`", files.identity))?;
    print(&inventory_text(&files.identity, &inv))?;
    let stats = if args.read {
        let st = read_all(files.checkpoint.as_ref(), |_| {})
            .with_context(|| format!("while reading the tensors of `{}`", files.identity))?;
        print(&format!(
            "read {} tensors: {:.3} GB in {:.2} s = {:.2} GB/s ({:.0}% borrowed from the file map, checksum {:016x})\n",
            st.tensors,
            st.bytes as f64 / 1e9,
            st.seconds,
            st.gb_per_s(),
            100.0 * st.borrowed_bytes as f64 / st.bytes.max(1) as f64,
            st.checksum
        ))?;
        Some(st)
    } else {
        None
    };
    if let Some(path) = &args.json {
        let report = Report { model: &files.identity, inventory: &inv, read: stats.as_ref() };
        let text = serde_json::to_string_pretty(&report)?;
        std::fs::write(path, text + "\n").with_context(|| format!("while writing {}", path.display()))?;
    }
    Ok(())
}

/// Write to stdout; a closed pipe (`dejavu inspect | head`) ends the output quietly, not with a panic.
fn print(text: &str) -> anyhow::Result<()> {
    match std::io::stdout().lock().write_all(text.as_bytes()) {
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => Ok(r?),
    }
}

fn inventory_text(identity: &str, inv: &Inventory) -> String {
    let mut o = String::new();
    let _ = writeln!(o, "model     {identity}");
    let _ = writeln!(o, "family    {:?}", inv.family);
    let _ = writeln!(o, "layers    {}", inv.layers);
    let _ = writeln!(o, "d / ffn   {} / {}", inv.hidden, inv.ffn);
    let _ = writeln!(o, "heads     {} (kv {})", inv.heads, inv.kv_heads);
    let _ = writeln!(o, "vocab     {}", inv.vocab);
    let _ = writeln!(
        o,
        "params    {} ({:.1}M) in {} tensors, {}",
        inv.params,
        inv.params as f64 / 1e6,
        inv.tensors.len(),
        human_bytes(inv.bytes as u64)
    );
    let mix: Vec<String> = inv
        .dtypes
        .iter()
        .map(|(d, s)| format!("{d}: {} tensors, {}", s.tensors, human_bytes(s.bytes as u64)))
        .collect();
    let _ = writeln!(o, "dtypes    {}\n", mix.join("; "));
    let width = inv.tensors.iter().map(|t| t.name.len()).max().unwrap_or(4).max(4);
    let _ = writeln!(o, "{:width$}  {:6}  {:>16}  {:>12}", "name", "dtype", "shape", "bytes");
    for t in &inv.tensors {
        let shape = format!("{:?}", t.shape);
        let _ = writeln!(o, "{:width$}  {:6}  {:>16}  {:>12}", t.name, t.stored, shape, t.bytes);
    }
    o
}
