//! `attn-bench` with no arguments (or `attn-bench demo`): dense vs window attention on one layer
//! of the bundled fixture, softmax and entmax-1.5, on the default adapter.

use crate::common::*;
use crate::dataset::{self, LayerCase};
use crate::eval::{evaluate_pattern, Extras, Runner};
use crate::methods::Method;
use clap::Args;
use serde_json::json;
use sparse_attn::{AttentionOptions, Normalizer};
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct DemoArgs {
    /// Q/K/V safetensors file [default: the bundled fixture tests/fixtures/minilm_small.safetensors]
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Text [default: the first text of the file]
    #[arg(long, value_name = "NAME")]
    pub text: Option<String>,
    /// Layer (original layer id) [default: the first layer of the file]
    #[arg(long, value_name = "L")]
    pub layer: Option<usize>,
    /// Window width in tokens
    #[arg(long, default_value_t = 64)]
    pub width: u32,
    /// Block size
    #[arg(long, default_value_t = 32)]
    pub block: u32,
    /// Timed runs (median reported) after one warm-up run
    #[arg(long, default_value_t = 5)]
    pub repeats: usize,
    /// Output directory of report.json [default: target/attn-bench/demo]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

pub fn run(g: &Globals, a: &DemoArgs) -> BResult<()> {
    check_block(a.block)?;
    if a.width == 0 {
        return Err(BenchError::input("--width must be at least 1"));
    }
    let data_path = a.data.clone().unwrap_or_else(sparse_attn::data::fixture_path);
    let data = dataset::open(&data_path)?;
    let text = match &a.text {
        Some(t) => dataset::check_text(&data, t)?,
        None => data.texts()[0].clone(),
    };
    let layer = a.layer.unwrap_or(data.layer_ids()[0]);
    let layer_index = dataset::layer_index(&data, layer)?;
    let engine = g.engine()?;
    let out = a.out.clone().unwrap_or_else(|| default_out("demo"));
    create_out_dir(&out)?;
    let prov = Provenance::new(Some(&engine), "gpu", "f32", 0).with_data(&data);

    let info = engine.adapter_info();
    if g.human() {
        println!(
            "attn-bench demo: {} text `{text}` layer {layer} ({} heads x {} tokens x {} dims), adapter {} ({}), f32, block {}",
            data.path().file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
            data.heads(),
            data.seq(),
            data.head_dim(),
            info.name,
            info.backend.to_str(),
            a.block
        );
        println!(
            "{:<10} {:<18} {:>10} {:>12} {:>12} {:>8} {:>9} {:>13}",
            "normalizer", "pattern", "time_ms", "max_abs_err", "err_vs_dense", "recall", "sparsity", "support/query"
        );
    }
    let methods = [Method::Dense, Method::Window { width: a.width }];
    let mut rows = Vec::new();
    for normalizer in [Normalizer::Softmax, Normalizer::ENTMAX15] {
        let case = LayerCase::load(&data, &text, layer_index, Some(normalizer))?;
        for method in &methods {
            let (pattern, build_ms) = crate::eval::build(&case, method, a.block, &crate::methods::Models::default())?;
            let runner = Runner::Gpu { engine: &engine, opts: AttentionOptions::new(normalizer), warmup: 1, repeats: a.repeats };
            let ev = evaluate_pattern(&case, &pattern, build_ms, &runner, Extras { support: true, reference: true })
                .map_err(|e| e.context(method.label()))?;
            let max_err = ev.max_abs_error_vs_reference.unwrap_or(f64::NAN);
            let support = ev.mean_support();
            if g.human() {
                println!(
                    "{:<10} {:<18} {:>10.3} {:>12.2e} {:>12.2e} {:>8.4} {:>9.4} {:>13}",
                    normalizer.label(),
                    method.label(),
                    ev.attention_ms,
                    max_err,
                    ev.mean_of(|m| m.output_error),
                    ev.mean_of(|m| m.recall),
                    ev.mean_of(|m| m.element_sparsity),
                    support.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into())
                );
            }
            rows.push(json!({
                "normalizer": normalizer.label(),
                "method": method.name().as_str(),
                "label": method.label(),
                "attention_ms": ev.attention_ms,
                "timer": ev.timer,
                "build_ms": ev.build_ms,
                "max_abs_error_vs_reference": jnum(max_err),
                "output_error_vs_dense": jnum(ev.mean_of(|m| m.output_error)),
                "recall": ev.mean_of(|m| m.recall),
                "element_sparsity": ev.mean_of(|m| m.element_sparsity),
                "block_sparsity": ev.mean_of(|m| m.block_sparsity),
                "mean_support": support,
                "gold_mean_support": case.gold_mean_support(),
            }));
        }
    }
    let report_path = out.join("report.json");
    let report = json!({
        "provenance": prov,
        "config": {"data": data.path().display().to_string(), "text": text, "layer": layer, "width": a.width, "block": a.block, "repeats": a.repeats, "warmup": 1, "dtype": "f32", "path": "auto"},
        "rows": rows,
        "notes": {
            "time_ms": "median of the timed runs of one call over all heads (GPU timestamps when the adapter has them, else wall clock)",
            "max_abs_err": "max |O_gpu - O_ref| against the CPU reference (f64) on the same pattern",
            "err_vs_dense": "mean over heads of ||O - O_dense||/||O_dense||, O_dense = exact dense attention with the same normaliser",
            "recall": "share of the exact entmax-1.5 support inside the pattern",
            "support/query": "mean keys with p > 0 per query (row stats of the GPU entmax kernel)",
        },
    });
    write_json(&report_path, &report)?;
    if g.human() {
        println!("report: {}", report_path.display());
    }
    g.print_json(&report)?;
    Ok(())
}
