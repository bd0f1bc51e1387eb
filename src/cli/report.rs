//! `dejavu report RUN`: the run's results as one self-contained HTML page, SVG charts and a markdown summary.

use std::path::PathBuf;

use anyhow::Context;

#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Run directory to report on (reads eval/, predictors/metrics.csv and bench.json or bench/*.json there).
    pub run: PathBuf,
    /// Output directory (default: RUN/report).
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Also print the markdown summary to stdout.
    #[arg(long)]
    pub print: bool,
}

pub fn run(args: Args) -> anyhow::Result<()> {
    let data = dejavu::report::load(&args.run).context("report")?;
    let report = dejavu::report::build(&data);
    let out = args.out.clone().unwrap_or_else(|| args.run.join("report"));
    let page = dejavu::report::write(&out, &report).context("report")?;
    if args.print {
        super::out(&report.markdown)?;
    }
    eprintln!(
        "wrote {} ({} chart{}, summary.md) from {}",
        page.display(),
        report.charts.len(),
        if report.charts.len() == 1 { "" } else { "s" },
        data.sources.join(", ")
    );
    Ok(())
}
