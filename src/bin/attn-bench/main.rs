//! `attn-bench`: the headless benchmark of sparse-attn (DESIGN.md, "The benchmark binary").
//!
//! - `attn-bench` (or `attn-bench demo`): dense vs window on the bundled fixture, softmax and
//!   entmax-1.5: time, max error against the CPU reference, mean support per query.
//! - `attn-bench info`: adapters, backend, driver, limits, features, capabilities.
//! - `attn-bench quality`: one method on one (text, layer); per-head metrics.json.
//! - `attn-bench pareto`: knob sweeps over the real data; pareto.csv/json and SVG curves.
//! - `attn-bench speed`: seq x density x normaliser x dtype x path; speed.csv/json and SVG.
//! - `attn-bench fit-sparsefinder`: fits the Sparsefinder model.
//!
//! Every result file records its provenance (crate version, git revision, adapter, driver,
//! limits, features, dtype, seed, command line, date). Bad input is a one-line error and exit
//! code 2; runtime failures (no adapter, GPU errors) exit with 1.

mod common;
mod dataset;
mod demo;
mod eval;
mod fit;
mod info;
mod methods;
mod pareto;
mod plot;
mod quality;
mod speed;

use clap::{Parser, Subcommand};
use common::{BenchError, Globals};
use std::process::ExitCode;

#[derive(Parser, Debug)]
#[command(
    name = "attn-bench",
    version,
    about = "Benchmark of sparse-attn: quality (recall, sparsity, error), Pareto curves and speed of block-sparse attention on wgpu",
    long_about = "Benchmark of sparse-attn: quality (recall, sparsity, error), Pareto curves and speed of block-sparse attention on wgpu.\n\n\
Without a subcommand, runs a short demo on the bundled fixture (dense vs window, softmax and entmax-1.5) and writes target/attn-bench/demo/report.json.\n\
The adapter is the best one wgpu finds, or --adapter / $SPARSE_ATTN_ADAPTER (a backend name or a substring of the adapter name). \
RUST_LOG sets the log level (logs go to stderr).\n\
Exit codes: 0 ok, 1 runtime failure (no adapter, GPU error), 2 bad input."
)]
struct Cli {
    #[command(subcommand)]
    cmd: Option<Cmd>,
    /// No progress bars and no human-readable output on stdout
    #[arg(long, global = true)]
    quiet: bool,
    /// Print the run's summary as JSON on stdout (instead of the human-readable text)
    #[arg(long, global = true)]
    json: bool,
    /// Adapter: a backend name (vulkan, metal, dx12, gl) or a substring of the adapter name
    /// [default: $SPARSE_ATTN_ADAPTER, else the best adapter]
    #[arg(long, global = true, value_name = "NAME")]
    adapter: Option<String>,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// The default demo: dense vs window attention on one layer of the bundled fixture
    Demo(demo::DemoArgs),
    /// Adapters, backend, driver, limits, features and capabilities
    Info(info::InfoArgs),
    /// One method on one text and layer of the real data: metrics.json per head
    Quality(quality::QualityArgs),
    /// Sweep each method's knob over the real data: pareto.csv, pareto.json, SVG curves
    Pareto(pareto::ParetoArgs),
    /// Sequence length x density x normaliser x dtype x kernel path: speed.csv, speed.json, SVG
    Speed(speed::SpeedArgs),
    /// Fit the Sparsefinder projections on real Q/K; writes the model JSON
    FitSparsefinder(fit::FitSparsefinderArgs),
}

fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn"));
    let _ = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).with_target(false).try_init();
}

fn run(cli: Cli) -> Result<(), BenchError> {
    let g = Globals { quiet: cli.quiet, json: cli.json, adapter: cli.adapter.filter(|a| !a.is_empty()) };
    match cli.cmd {
        None => match Cli::parse_from(["attn-bench", "demo"]).cmd {
            Some(Cmd::Demo(a)) => demo::run(&g, &a),
            _ => unreachable!("`attn-bench demo` parses as the demo"),
        },
        Some(Cmd::Demo(a)) => demo::run(&g, &a),
        Some(Cmd::Info(a)) => info::run(&g, &a),
        Some(Cmd::Quality(a)) => quality::run(&g, &a),
        Some(Cmd::Pareto(a)) => pareto::run(&g, &a),
        Some(Cmd::Speed(a)) => speed::run(&g, &a),
        Some(Cmd::FitSparsefinder(a)) => fit::run(&g, &a),
    }
}

/// A closed stdout (`attn-bench ... | head`) ends the process quietly, as SIGPIPE would.
fn quiet_broken_pipe() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let msg = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        if msg.contains("failed printing to stdout") {
            std::process::exit(141);
        }
        default(info);
    }));
}

fn main() -> ExitCode {
    quiet_broken_pipe();
    let cli = Cli::parse();
    init_tracing();
    match std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| run(cli))) {
        Ok(Ok(())) => ExitCode::SUCCESS,
        Ok(Err(e)) => {
            eprintln!("attn-bench: error: {e}");
            ExitCode::from(e.exit_code())
        }
        Err(_) => {
            eprintln!("attn-bench: internal error (panic; see the message above)");
            ExitCode::from(101)
        }
    }
}
