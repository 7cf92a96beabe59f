//! `attn-bench fit-sparsefinder`: fits the Sparsefinder projections on real Q/K and writes the
//! model JSON that `quality --method sparsefinder --model` and `pareto --sparsefinder-model` read.

use crate::common::*;
use crate::dataset;
use clap::Args;
use serde_json::json;
use sparse_attn::patterns::sparsefinder::{fit_from_data, SparsefinderConfig, SparsefinderModel};
use std::path::PathBuf;

#[derive(Args, Debug, Clone)]
pub struct FitSparsefinderArgs {
    /// Q/K/V safetensors file [default: $SPARSE_ATTN_DATA, else ../shared/data/minilm_qkv.safetensors
    /// when present, else the bundled fixture]
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Texts to fit on, comma-separated [default: every text but the first, which is held out;
    /// every text when the file has only one]
    #[arg(long, value_name = "LIST")]
    pub texts: Option<String>,
    /// α of the entmax support to predict
    #[arg(long, default_value_t = 1.5)]
    pub alpha: f64,
    /// Projection dimension r [default: 4, the paper's]
    #[arg(long)]
    pub rank: Option<usize>,
    /// Training epochs [default: the library's (20)]
    #[arg(long)]
    pub epochs: Option<usize>,
    /// Local window width in tokens kept in every predicted pattern [default: 11, the paper's]
    #[arg(long)]
    pub window: Option<u32>,
    /// Worker threads (0 = all cores); results do not depend on it
    #[arg(long, default_value_t = 0)]
    pub threads: usize,
    /// Seed of every random choice
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Where to write the model JSON [default: DIR/sparsefinder.json with DIR = target/attn-bench/fit-sparsefinder]
    #[arg(long, value_name = "FILE")]
    pub out: Option<PathBuf>,
}

pub fn run(g: &Globals, a: &FitSparsefinderArgs) -> BResult<()> {
    let data_path = dataset::resolve_data_path(a.data.as_deref());
    let data = dataset::open(&data_path)?;
    let texts: Vec<String> = match &a.texts {
        Some(t) => dataset::select_texts(&data, Some(t))?,
        None if data.texts().len() > 1 => data.texts()[1..].to_vec(),
        None => data.texts().to_vec(),
    };
    if !(a.alpha > 1.0 && a.alpha <= 2.0) {
        return Err(BenchError::input(format!("--alpha {}: must lie in (1, 2]", a.alpha)));
    }
    let mut config = SparsefinderConfig { seed: a.seed, threads: a.threads, ..SparsefinderConfig::default() };
    if let Some(r) = a.rank {
        config.rank = r;
    }
    if let Some(e) = a.epochs {
        config.epochs = e;
    }
    if let Some(w) = a.window {
        config.window = w;
    }
    config.validate()?;
    let out = match &a.out {
        Some(p) => p.clone(),
        None => default_out("fit-sparsefinder").join("sparsefinder.json"),
    };
    if let Some(dir) = out.parent().filter(|d| !d.as_os_str().is_empty()) {
        create_out_dir(dir)?;
    }
    if g.human() {
        eprintln!(
            "fitting sparsefinder on {} texts {:?} ({} layers x {} heads, {} tokens), rank {}, {} epochs ...",
            data.path().display(),
            texts,
            data.layers(),
            data.heads(),
            data.seq(),
            config.rank,
            config.epochs
        );
    }
    let refs: Vec<&str> = texts.iter().map(String::as_str).collect();
    let model: SparsefinderModel = fit_from_data(&data_path, &refs, a.alpha, &config)?;
    model.save(&out)?;
    let prov = Provenance::new(None, "cpu", "f32", a.seed).with_data(&data);
    let heads = model.head_models();
    let loss = mean(&heads.iter().map(|h| h.final_loss).collect::<Vec<_>>());
    let support = mean(&heads.iter().map(|h| h.mean_support).collect::<Vec<_>>());
    let report = json!({
        "provenance": prov,
        "model": out.display().to_string(),
        "texts": texts,
        "alpha": a.alpha,
        "config": model.config(),
        "layers": model.layers(), "heads": model.heads(), "head_dim": model.head_dim(), "rank": model.rank(),
        "fit_seconds": model.fit_info().fit_seconds,
        "mean_final_loss": jnum(loss),
        "mean_gold_support": jnum(support),
    });
    let report_path = out.with_extension("fit.json");
    write_json(&report_path, &report)?;
    if g.human() {
        println!(
            "fitted {} layers x {} heads (rank {}) in {:.1} s; mean final hinge loss {loss:.4}; mean gold support {support:.1} keys/query",
            model.layers(),
            model.heads(),
            model.rank(),
            model.fit_info().fit_seconds
        );
        println!("wrote {} (fit report {})", out.display(), report_path.display());
    }
    g.print_json(&report)?;
    Ok(())
}
