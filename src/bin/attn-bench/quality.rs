//! `attn-bench quality`: one method on one (text, layer) of the real data; per-head metrics.

use crate::common::*;
use crate::dataset::{self, LayerCase};
use crate::eval::{evaluate, Extras, Runner};
use crate::methods::{self, MethodFlags, MethodName};
use clap::{Args, ValueEnum};
use serde_json::json;
use sparse_attn::{AttentionOptions, DType};
use std::path::PathBuf;

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum DeviceArg {
    /// The engine on the GPU adapter.
    Gpu,
    /// The naive CPU reference (f64).
    Cpu,
}

#[derive(Args, Debug, Clone)]
pub struct QualityArgs {
    /// Q/K/V safetensors file [default: $SPARSE_ATTN_DATA, else ../shared/data/minilm_qkv.safetensors
    /// when present, else the bundled fixture]
    #[arg(long, value_name = "FILE")]
    pub data: Option<PathBuf>,
    /// Text of the file [default: the first text]
    #[arg(long, value_name = "NAME")]
    pub text: Option<String>,
    /// Layer (original layer id, as listed by the file's layer_ids)
    #[arg(long, value_name = "L", default_value_t = 0)]
    pub layer: usize,
    /// Pattern method
    #[arg(long, value_enum, default_value_t = MethodName::Window)]
    pub method: MethodName,
    #[command(flatten)]
    pub method_flags: MethodFlags,
    /// Row normaliser: softmax, entmax15, sparsemax or entmax:ALPHA (output error is against exact
    /// dense attention with it; recall is always against the exact entmax-1.5 support)
    #[arg(long, value_name = "N", default_value = "entmax15")]
    pub normalizer: String,
    /// Where the sparse attention is computed
    #[arg(long, value_enum, default_value_t = DeviceArg::Gpu)]
    pub device: DeviceArg,
    /// Storage type on the GPU (f16 needs SHADER_F16)
    #[arg(long, value_name = "T", default_value = "f32")]
    pub dtype: String,
    /// Kernel path on the GPU: auto, fused, three-kernel
    #[arg(long, value_name = "P", default_value = "auto")]
    pub path: String,
    /// Block size of the pattern (power of two, 16..=128)
    #[arg(long, default_value_t = 32)]
    pub block: u32,
    /// Timed runs (median reported) after one warm-up run
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Seed of seeded methods (random; sbm: k-means init and edge sampling)
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output directory for metrics.json (and output.safetensors) [default: target/attn-bench/quality]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
    /// Also write DIR/output.safetensors with `o` f32 [heads, seq, head_dim]
    #[arg(long)]
    pub dump_output: bool,
}

pub fn run(g: &Globals, a: &QualityArgs) -> BResult<()> {
    let normalizer = parse_normalizer(&a.normalizer)?;
    let dtype = parse_dtype(&a.dtype)?;
    let path = parse_path(&a.path)?;
    check_block(a.block)?;
    let mut method = methods::from_flags(a.method, &a.method_flags, a.seed)?;
    methods::resolve_mra(&mut method, a.method_flags.mode, normalizer)?;
    if a.device == DeviceArg::Cpu && (dtype != DType::F32 || path != sparse_attn::ExecPath::Auto) {
        return Err(BenchError::input("--dtype and --path apply to --device gpu only"));
    }
    let data_path = dataset::resolve_data_path(a.data.as_deref());
    let data = dataset::open(&data_path)?;
    let text = match &a.text {
        Some(t) => dataset::check_text(&data, t)?,
        None => data.texts()[0].clone(),
    };
    let layer_index = dataset::layer_index(&data, a.layer)?;
    let f = &a.method_flags;
    let out = a.out.clone().unwrap_or_else(|| default_out("quality"));
    create_out_dir(&out)?;
    let texts = [text.clone()];
    let files = methods::ModelFiles {
        sparsefinder: f.model.as_deref(),
        sbm: f.sbm_model.as_deref(),
        topk: f.scorer.as_deref(),
        lowrank: f.lowrank_model.as_deref(),
        texts: &texts,
        cache_dir: Some(&out),
    };
    let models = methods::Models::load(std::slice::from_ref(&method), files, &data)?;
    let engine = match a.device {
        DeviceArg::Gpu => Some(g.engine()?),
        DeviceArg::Cpu => None,
    };

    let case = LayerCase::load(&data, &text, layer_index, Some(normalizer))?;
    let runner = match &engine {
        Some(e) => Runner::Gpu { engine: e, opts: AttentionOptions { normalizer, dtype, path, ..Default::default() }, warmup: 1, repeats: a.repeats },
        None => Runner::Cpu { normalizer },
    };
    let ev = evaluate(&case, &method, a.block, &models, &runner, Extras { support: true, reference: engine.is_some() })?;

    let prov = Provenance::new(engine.as_ref(), if engine.is_some() { "gpu" } else { "cpu" }, dtype.label(), a.seed).with_data(&data);
    let heads = case.shape.heads as f64;
    let (variant, knob, value) = method.describe();
    let per_head: Vec<_> = ev
        .heads
        .iter()
        .enumerate()
        .map(|(h, m)| {
            json!({
                "head": h,
                "head_id": data.head_ids()[h],
                "recall": m.recall,
                "element_sparsity": m.element_sparsity,
                "block_sparsity": m.block_sparsity,
                "output_error": jnum(m.output_error),
                "mean_support": m.mean_support,
                "gold_mean_support": m.gold_mean_support,
                "build_ms": ev.build_ms / heads,
                "attention_ms": ev.attention_ms / heads,
            })
        })
        .collect();
    let model_file = [&a.method_flags.model, &a.method_flags.sbm_model, &a.method_flags.scorer, &a.method_flags.lowrank_model].into_iter().flatten().next().map(|p| p.display().to_string());
    let summary = json!({
        "recall": ev.mean_of(|m| m.recall),
        "element_sparsity": ev.mean_of(|m| m.element_sparsity),
        "block_sparsity": ev.mean_of(|m| m.block_sparsity),
        "output_error": jnum(ev.mean_of(|m| m.output_error)),
        "mean_support": ev.mean_support(),
        "gold_mean_support": case.gold_mean_support(),
        "build_ms": ev.build_ms,
        "attention_ms": ev.attention_ms,
        "timer": ev.timer,
        "stage_ms": ev.stage_ms,
        "max_abs_error_vs_reference": ev.max_abs_error_vs_reference,
        "stored_blocks": ev.stored_blocks,
        "pattern_slices": ev.pattern_slices,
    });
    let metrics_path = out.join("metrics.json");
    let mut report = json!({
        "provenance": prov,
        "config": {
            "data": data.path().display().to_string(),
            "text": text,
            "layer": a.layer,
            "layer_index": layer_index,
            "method": a.method.as_str(),
            "variant": variant,
            "knob": knob,
            "value": value,
            "label": method.label(),
            "params": format!("{method:?}"),
            "model_file": model_file,
            "lowrank_model": models.lowrank.as_ref().map(|l| l.info.clone()),
            "normalizer": normalizer.label(),
            "gold_alpha": dataset::GOLD_ALPHA,
            "device": if engine.is_some() { "gpu" } else { "cpu" },
            "dtype": dtype.label(),
            "path": path.label(),
            "block": a.block,
            "repeats": a.repeats,
            "warmup": 1,
            "seed": a.seed,
        },
        "shape": {"heads": case.shape.heads, "seq": case.shape.seq_q, "head_dim": case.shape.head_dim},
        "summary": summary,
        "heads": per_head,
        "notes": {
            "recall": "share of the exact entmax-1.5 support (dense scores, CPU f64) inside the pattern",
            "output_error": "||O - O_exact||_F / ||O_exact||_F per head, O_exact = exact dense attention with the run's normaliser (CPU f64)",
            "per_head_times": "build_ms and attention_ms per head are the one call over all heads divided by the head count; summary holds the whole call (median of the timed runs)",
            "mean_support": "mean number of keys with p > 0 per query of the computed (pattern-restricted) attention; entmax only",
        },
        "files": {"metrics": metrics_path.display().to_string()},
    });
    if matches!(method, methods::Method::LowRank { .. }) {
        report["notes"]["lowrank"] = json!(LOWRANK_NOTE);
    }
    if matches!(method, methods::Method::Mra { .. }) {
        report["notes"]["mra"] = json!("mra: budget blocks_per_row x q_blocks blocks per slice (priors included) chosen from low-resolution block-mean scores; variant full = MRA-2 (coarse remainder merged into the softmax, so output_error includes it; max_abs_error_vs_reference is against the MRA-2 reference), sparse = MRA-2-s; recall and sparsity are of the selected blocks; build_ms = block means of Q/K/V + low-resolution scores + selection (+ row terms), on the GPU when the run has an adapter (read-back included), else on the CPU");
    }
    if a.dump_output {
        let o_path = out.join("output.safetensors");
        write_output(&o_path, &ev.o, &prov)?;
        report["files"]["output"] = json!(o_path.display().to_string());
    }
    write_json(&metrics_path, &report)?;

    if g.human() {
        println!(
            "quality: {} on {} text {text} layer {} ({} heads x {} tokens x {}), {} on {}",
            method.label(),
            data.path().file_name().map(|f| f.to_string_lossy().to_string()).unwrap_or_default(),
            a.layer,
            case.shape.heads,
            case.shape.seq_q,
            case.shape.head_dim,
            normalizer.label(),
            prov.adapter_label()
        );
        println!("{:>4} {:>8} {:>9} {:>9} {:>10} {:>9} {:>9}", "head", "recall", "elem_sp", "block_sp", "out_err", "support", "gold_sup");
        for (h, m) in ev.heads.iter().enumerate() {
            println!(
                "{:>4} {:>8.4} {:>9.4} {:>9.4} {:>10.3e} {:>9} {:>9.2}",
                data.head_ids()[h],
                m.recall,
                m.element_sparsity,
                m.block_sparsity,
                m.output_error,
                m.mean_support.map(|s| format!("{s:.2}")).unwrap_or_else(|| "-".into()),
                m.gold_mean_support
            );
        }
        println!(
            "mean: recall {:.4}, element sparsity {:.4}, block sparsity {:.4}, output error {:.3e}; build {:.2} ms, attention {:.2} ms ({}){}",
            ev.mean_of(|m| m.recall),
            ev.mean_of(|m| m.element_sparsity),
            ev.mean_of(|m| m.block_sparsity),
            ev.mean_of(|m| m.output_error),
            ev.build_ms,
            ev.attention_ms,
            ev.timer,
            ev.max_abs_error_vs_reference.map(|e| format!("; max |O - O_ref| {e:.2e}")).unwrap_or_default()
        );
        println!("wrote {}", metrics_path.display());
    }
    g.print_json(&report)?;
    Ok(())
}

/// `o` f32 `[heads, seq, head_dim]` (batch 1 dropped) with the provenance as metadata.
fn write_output(path: &std::path::Path, o: &ndarray::Array4<f32>, prov: &Provenance) -> BResult<()> {
    let shape = vec![o.shape()[1], o.shape()[2], o.shape()[3]];
    let bytes: Vec<u8> = o.iter().flat_map(|x| x.to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::F32, shape, &bytes).map_err(|e| BenchError::runtime(format!("output tensor: {e}")))?;
    let mut meta = std::collections::HashMap::new();
    meta.insert("provenance".to_string(), serde_json::to_string(prov).unwrap_or_default());
    meta.insert("layout".to_string(), "o: [heads, seq, head_dim] f32".to_string());
    safetensors::serialize_to_file([("o", view)], Some(meta), path).map_err(|e| BenchError::runtime(format!("cannot write `{}`: {e}", path.display())))
}

/// How the full-row low-rank method's measures read (it has no block pattern).
pub const LOWRANK_NOTE: &str = "lowrank (full-row reconstruction) has no block pattern: recall = share of the exact entmax-1.5 support where entmax-1.5 of the reconstructed score row is positive; element_sparsity = 1 - m/n (scores not computed exactly); block_sparsity = 1 - (key blocks holding a subset position)/(key blocks); mean_support = keys with p > 0 per query of entmax-1.5 over the reconstructed row; output_error = O from the run's normaliser over the reconstructed row vs exact dense attention; the GPU path is f32 whatever --dtype/--path say; stored_blocks = 0";
