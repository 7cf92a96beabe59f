//! `attn-bench pareto`: sweeps each method's knob over the real data and draws sparsity–recall
//! and sparsity–error curves, with the numbers in pareto.csv / pareto.json.

use crate::common::*;
use crate::dataset::{self, LayerCase};
use crate::eval::{evaluate, Extras, Runner};
use crate::methods::{self, Method, MethodName, SweepFlags};
use crate::plot::{self, Panel, Series};
use crate::quality::DeviceArg;
use clap::Args;
use serde_json::{json, Value};
use sparse_attn::{AttentionOptions, DType};
use std::path::PathBuf;

/// pareto.csv's fixed columns (DESIGN.md); extra columns follow.
pub const PARETO_COLUMNS: &str = "method,variant,knob,value,recall,element_sparsity,block_sparsity,output_error,build_ms,attention_ms";

#[derive(Args, Debug, Clone)]
pub struct ParetoArgs {
    /// Q/K/V safetensors file [default: $SPARSE_ATTN_DATA, else ../shared/data/minilm_qkv.safetensors
    /// when present, else the bundled fixture]
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Methods swept, comma-separated (dense, window, global, random, sparsefinder, sbm, topk, lowrank, lowrank-pattern, mra); dense is
    /// added as the reference point unless --no-dense
    #[arg(long, value_name = "LIST", default_value = "window")]
    pub methods: String,
    /// Leave out the dense reference point
    #[arg(long)]
    pub no_dense: bool,
    /// Texts, comma-separated [default: every text in the file]
    #[arg(long, value_name = "LIST")]
    pub texts: Option<String>,
    /// Layers (original ids), comma-separated [default: every layer in the file]
    #[arg(long, value_name = "LIST")]
    pub layers: Option<String>,
    /// Row normaliser of the attention whose output error is measured (recall is always against
    /// the exact entmax-1.5 support)
    #[arg(long, value_name = "N", default_value = "entmax15")]
    pub normalizer: String,
    #[command(flatten)]
    pub sweep: SweepFlags,
    /// Where the sparse attention is computed
    #[arg(long, value_enum, default_value_t = DeviceArg::Gpu)]
    pub device: DeviceArg,
    /// Storage type on the GPU (f16 needs SHADER_F16)
    #[arg(long, value_name = "T", default_value = "f32")]
    pub dtype: String,
    /// Kernel path on the GPU: auto, fused, three-kernel
    #[arg(long, value_name = "P", default_value = "auto")]
    pub path: String,
    /// Block size of every pattern (block_sparsity is at this size)
    #[arg(long, default_value_t = 32)]
    pub block: u32,
    /// Timed GPU runs per cell (median) after one warm-up run
    #[arg(long, default_value_t = 1)]
    pub repeats: usize,
    /// Seed of seeded methods (random; sbm: k-means init and edge sampling)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Refuse sweeps with more (text, layer, method, knob) evaluations than this
    #[arg(long, value_name = "N", default_value_t = 5000)]
    pub max_cells: usize,
    /// Output directory [default: target/attn-bench/pareto]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

#[derive(Default, Clone)]
struct Acc {
    recall: Vec<f64>,
    elem: Vec<f64>,
    block: Vec<f64>,
    error: Vec<f64>,
    build_ms: Vec<f64>,
    attention_ms: Vec<f64>,
}

pub fn run(g: &Globals, a: &ParetoArgs) -> BResult<()> {
    let normalizer = parse_normalizer(&a.normalizer)?;
    let dtype = parse_dtype(&a.dtype)?;
    let path = parse_path(&a.path)?;
    check_block(a.block)?;
    if a.device == DeviceArg::Cpu && (dtype != DType::F32 || path != sparse_attn::ExecPath::Auto) {
        return Err(BenchError::input("--dtype and --path apply to --device gpu only"));
    }
    if a.repeats == 0 {
        return Err(BenchError::input("--repeats must be at least 1"));
    }
    let mut names = MethodName::parse_list("--methods", &a.methods)?;
    methods::check_sweep_flags(&names, &a.sweep)?;
    if !a.no_dense && !names.contains(&MethodName::Dense) {
        names.insert(0, MethodName::Dense);
    }
    let mut sweep: Vec<Method> = Vec::new();
    for n in &names {
        sweep.extend(methods::sweep(*n, &a.sweep, a.seed, normalizer)?);
    }
    let data_path = dataset::resolve_data_path(a.data.as_deref());
    let data = dataset::open(&data_path)?;
    let texts = dataset::select_texts(&data, a.texts.as_deref())?;
    let layers = dataset::select_layers(&data, a.layers.as_deref())?;
    let cells = texts.len() * layers.len() * sweep.len();
    if cells > a.max_cells {
        return Err(BenchError::input(format!(
            "sweep too big: {} texts x {} layers x {} method settings = {cells} evaluations exceed --max-cells {}",
            texts.len(),
            layers.len(),
            sweep.len(),
            a.max_cells
        )));
    }
    let out = a.out.clone().unwrap_or_else(|| default_out("pareto"));
    create_out_dir(&out)?;
    let files = methods::ModelFiles {
        sparsefinder: a.sweep.sparsefinder_model.as_deref(),
        sbm: a.sweep.sbm_model.as_deref(),
        topk: a.sweep.topk_scorer.as_deref(),
        lowrank: a.sweep.lowrank_model.as_deref(),
        texts: &texts,
        cache_dir: Some(&out),
    };
    let models = methods::Models::load(&sweep, files, &data)?;
    let engine = match a.device {
        DeviceArg::Gpu => Some(g.engine()?),
        DeviceArg::Cpu => None,
    };
    let prov = Provenance::new(engine.as_ref(), if engine.is_some() { "gpu" } else { "cpu" }, dtype.label(), a.seed).with_data(&data);
    let runner = match &engine {
        Some(e) => Runner::Gpu { engine: e, opts: AttentionOptions { normalizer, dtype, path, ..Default::default() }, warmup: 1, repeats: a.repeats },
        None => Runner::Cpu { normalizer },
    };

    let started = std::time::Instant::now();
    let bar = progress(g, cells as u64, "pareto");
    let mut acc: Vec<Acc> = vec![Acc::default(); sweep.len()];
    let mut cell_json = Vec::new();
    let mut case_json = Vec::new();
    for text in &texts {
        for &(layer_index, layer) in &layers {
            bar.set_message(format!("{text} layer {layer}: exact reference"));
            let case = LayerCase::load(&data, text, layer_index, Some(normalizer)).map_err(|e| e.context(format!("text {text} layer {layer}")))?;
            case_json.push(json!({
                "text": text, "layer": layer, "gold_mean_support": case.gold_mean_support(),
                "gold_ms": case.gold_ms, "exact_ms": case.exact_ms,
            }));
            for (i, method) in sweep.iter().enumerate() {
                bar.set_message(format!("{text} layer {layer}: {}", method.label()));
                let ev = evaluate(&case, method, a.block, &models, &runner, Extras::default())
                    .map_err(|e| e.context(format!("text {text} layer {layer}")))?;
                let s = &mut acc[i];
                for m in &ev.heads {
                    s.recall.push(m.recall);
                    s.elem.push(m.element_sparsity);
                    s.block.push(m.block_sparsity);
                    s.error.push(m.output_error);
                }
                s.build_ms.push(ev.build_ms);
                s.attention_ms.push(ev.attention_ms);
                let (variant, knob, value) = method.describe();
                cell_json.push(json!({
                    "text": text, "layer": layer, "method": method.name().as_str(), "variant": variant, "knob": knob, "value": value,
                    "recall": ev.heads.iter().map(|m| m.recall).collect::<Vec<_>>(),
                    "element_sparsity": ev.heads.iter().map(|m| m.element_sparsity).collect::<Vec<_>>(),
                    "block_sparsity": ev.heads.iter().map(|m| m.block_sparsity).collect::<Vec<_>>(),
                    "output_error": ev.heads.iter().map(|m| jnum(m.output_error)).collect::<Vec<_>>(),
                    "build_ms": ev.build_ms, "attention_ms": ev.attention_ms, "timer": ev.timer,
                }));
                bar.inc(1);
            }
        }
    }
    bar.finish_and_clear();
    let elapsed_s = started.elapsed().as_secs_f64();

    // Rows: one per method x knob value, averaged over texts, layers and heads.
    let mut rows: Vec<Value> = Vec::new();
    let mut csv = format!("{PARETO_COLUMNS},label,recall_min,heads_measured,normalizer,device,dtype,path,block,{}\n", Provenance::csv_header());
    for (method, s) in sweep.iter().zip(&acc) {
        let (variant, knob, value) = method.describe();
        let min_recall = s.recall.iter().copied().fold(f64::INFINITY, f64::min);
        let row = json!({
            "method": method.name().as_str(), "variant": variant, "knob": knob, "value": value, "label": method.label(),
            "recall": mean(&s.recall), "element_sparsity": mean(&s.elem), "block_sparsity": mean(&s.block),
            "output_error": jnum(mean(&s.error)), "build_ms": mean(&s.build_ms), "attention_ms": mean(&s.attention_ms),
            "recall_min": jnum(min_recall), "heads_measured": s.recall.len(),
        });
        csv.push_str(
            &[
                csv_cell(method.name().as_str()),
                csv_cell(&variant),
                csv_cell(&knob),
                csv_cell(&value),
                num(mean(&s.recall)),
                num(mean(&s.elem)),
                num(mean(&s.block)),
                num(mean(&s.error)),
                num(mean(&s.build_ms)),
                num(mean(&s.attention_ms)),
                csv_cell(&method.label()),
                num(min_recall),
                s.recall.len().to_string(),
                normalizer.label(),
                prov.device.clone(),
                dtype.label().to_string(),
                path.label().to_string(),
                a.block.to_string(),
                prov.csv_cells(),
            ]
            .join(","),
        );
        csv.push('\n');
        rows.push(row);
    }
    let csv_path = out.join("pareto.csv");
    write_file(&csv_path, &csv)?;

    // Plots: one curve per method (and Sparsefinder variant); dense is a single point.
    let mut curves: Vec<(String, Vec<usize>)> = Vec::new();
    for (i, m) in sweep.iter().enumerate() {
        let c = m.curve();
        match curves.iter_mut().find(|(n, _)| *n == c) {
            Some((_, v)) => v.push(i),
            None => curves.push((c, vec![i])),
        }
    }
    let series = |y: &dyn Fn(&Acc) -> f64, x: &dyn Fn(&Acc) -> f64| -> Vec<Series> {
        curves
            .iter()
            .map(|(name, idx)| {
                let mut pts: Vec<((f64, f64), String)> = idx.iter().map(|&i| ((x(&acc[i]), y(&acc[i])), sweep[i].point_label())).collect();
                pts.sort_by(|p, q| p.0 .0.total_cmp(&q.0 .0));
                Series { name: name.clone(), points: pts.iter().map(|p| p.0).collect(), labels: pts.into_iter().map(|p| p.1).collect(), thin: false }
            })
            .collect()
    };
    let recall_of = |s: &Acc| mean(&s.recall);
    let elem_of = |s: &Acc| mean(&s.elem);
    let block_of = |s: &Acc| mean(&s.block);
    let err_of = |s: &Acc| mean(&s.error);
    let data_name = data.path().file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default();
    let panels = vec![
        Panel {
            title: "recall vs element sparsity".into(),
            x_label: "element sparsity (1 - computed pairs / all pairs)".into(),
            y_label: "recall of exact entmax-1.5 support".into(),
            log_x: false,
            log_y: false,
            x_range: Some((-0.02, 1.02)),
            y_range: Some((-0.02, 1.04)),
            series: series(&recall_of, &elem_of),
            legend_upper: false,
            x_ticks: None,
        },
        Panel {
            title: format!("recall vs block sparsity (block {})", a.block),
            x_label: format!("block sparsity at {0}x{0} blocks", a.block),
            y_label: "recall of exact entmax-1.5 support".into(),
            log_x: false,
            log_y: false,
            x_range: Some((-0.02, 1.02)),
            y_range: Some((-0.02, 1.04)),
            series: series(&recall_of, &block_of),
            legend_upper: false,
            x_ticks: None,
        },
        Panel {
            title: format!("output error vs sparsity ({})", normalizer.label()),
            x_label: "element sparsity".into(),
            y_label: format!("||O - O_dense|| / ||O_dense|| ({})", normalizer.label()),
            log_x: false,
            log_y: false,
            x_range: Some((-0.02, 1.02)),
            y_range: None,
            series: series(&err_of, &elem_of),
            legend_upper: true,
            x_ticks: None,
        },
    ];
    let title = format!(
        "Sparsity-recall Pareto: {data_name} ({} texts x {} layers x {} heads, {} tokens), {}",
        texts.len(),
        layers.len(),
        data.heads(),
        data.seq(),
        normalizer.label()
    );
    let subtitle = format!(
        "adapter {} | device {} | attn-bench {} git {} | {}",
        prov.adapter_label(),
        prov.device,
        prov.crate_version,
        prov.git_revision,
        prov.date_utc
    );
    let mut svgs = Vec::new();
    let all = out.join("pareto.svg");
    plot::draw(&all, &title, &subtitle, &panels, 3, &prov)?;
    svgs.push(all);
    for (panel, file) in panels.iter().zip(["recall_vs_element_sparsity.svg", "recall_vs_block_sparsity.svg", "error_vs_sparsity.svg"]) {
        let p = out.join(file);
        plot::draw(&p, &title, &subtitle, std::slice::from_ref(panel), 1, &prov)?;
        svgs.push(p);
    }

    let json_path = out.join("pareto.json");
    let report = json!({
        "provenance": prov,
        "config": {
            "data": data.path().display().to_string(), "texts": texts, "layers": layers.iter().map(|l| l.1).collect::<Vec<_>>(),
            "methods": names.iter().map(|m| m.as_str()).collect::<Vec<_>>(), "normalizer": normalizer.label(), "gold_alpha": dataset::GOLD_ALPHA,
            "device": prov.device, "dtype": dtype.label(), "path": path.label(), "block": a.block, "repeats": a.repeats, "warmup": 1, "seed": a.seed,
            "sparsefinder_model": models.sparsefinder.as_ref().map(|_| a.sweep.sparsefinder_model.clone().unwrap_or_else(sparse_attn::patterns::sparsefinder::SparsefinderModel::shipped_path).display().to_string()),
            "sbm_model": models.sbm.as_ref().and(a.sweep.sbm_model.as_ref()).map(|p| p.display().to_string()),
            "topk_scorer": models.topk.as_ref().and(a.sweep.topk_scorer.as_ref()).map(|p| p.display().to_string()),
            "lowrank_model": models.lowrank.as_ref().map(|l| l.info.clone()),
        },
        "columns": PARETO_COLUMNS.split(',').collect::<Vec<_>>(),
        "rows": rows,
        "cases": case_json,
        "cells": cell_json,
        "elapsed_s": elapsed_s,
        "notes": {
            "rows": "one per method x knob value, averaged over the texts, layers and heads of the run",
            "recall": "share of the exact entmax-1.5 support (dense scores, CPU f64) inside the pattern",
            "output_error": "||O - O_exact||_F / ||O_exact||_F per head; O_exact = exact dense attention with the run's normaliser (CPU f64)",
            "attention_ms": "median time of one call over all heads of a layer",
            "lowrank": crate::quality::LOWRANK_NOTE,
            "mra": "mra (Zeng et al. 2022) at the run's --block: budget blocks_per_row x q_blocks blocks per slice chosen globally from low-resolution block-mean scores, plus the diagonal and first block row/column; variant full = MRA-2 (the non-selected blocks' coarse estimate merged into the softmax; output_error includes it), sparse = MRA-2-s (selected blocks only); recall and sparsity are the selected pattern's; build_ms = block means of Q/K/V + low-resolution scores + selection (+ row terms), on the GPU when the run has an adapter (read-back included), else on the CPU",
            "lowrank_pattern": "lowrank-pattern: block pattern from the reconstructed rows (variant rR-mM = rank R, M exact scores per row), computed exactly by the engine like any pattern; its build_ms includes the subset scores and reconstruction on the CPU",
        },
        "files": {"csv": csv_path.display().to_string(), "svg": svgs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()},
    });
    write_json(&json_path, &report)?;

    if g.human() {
        println!("{title}");
        println!("{subtitle}");
        println!("{:<44} {:>8} {:>9} {:>9} {:>10} {:>9} {:>10}", "method", "recall", "elem_sp", "block_sp", "out_err", "build_ms", "attn_ms");
        for r in &rows {
            println!(
                "{:<44} {:>8.4} {:>9.4} {:>9.4} {:>10.3e} {:>9.3} {:>10.3}",
                r["label"].as_str().unwrap_or(""),
                r["recall"].as_f64().unwrap_or(f64::NAN),
                r["element_sparsity"].as_f64().unwrap_or(f64::NAN),
                r["block_sparsity"].as_f64().unwrap_or(f64::NAN),
                r["output_error"].as_f64().unwrap_or(f64::NAN),
                r["build_ms"].as_f64().unwrap_or(f64::NAN),
                r["attention_ms"].as_f64().unwrap_or(f64::NAN),
            );
        }
        println!("{cells} evaluations in {elapsed_s:.1} s; wrote {}, {}, {}", csv_path.display(), json_path.display(), svgs[0].display());
    }
    g.print_json(&json!({"provenance": report["provenance"], "config": report["config"], "rows": report["rows"], "elapsed_s": elapsed_s, "files": report["files"]}))?;
    Ok(())
}
