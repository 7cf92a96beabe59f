//! `attn-bench speed`: sequence length x density x normaliser x dtype x kernel path on synthetic
//! Q/K/V, dense vs each method; pattern-build time separate from attention time.

use crate::common::*;
use crate::methods::{self, Method, MethodName};
use crate::plot::{self, Panel, Series};
use clap::{Args, ValueEnum};
use ndarray::Array4;
use rand::{Rng, SeedableRng};
use serde_json::{json, Value};
use sparse_attn::patterns::mra::{Mra, MraMode};
use sparse_attn::patterns::Dense;
use sparse_attn::{AttentionOptions, AttentionShape, BlockPattern, DType, Engine, Error, ExecPath, Normalizer};
use std::path::PathBuf;
use std::time::Instant;

/// speed.csv's fixed columns (DESIGN.md); extra columns follow.
pub const SPEED_COLUMNS: &str = "method,path,normalizer,dtype,seq,heads,head_dim,block,density,build_ms,attention_ms,gflops";

#[derive(Args, Debug, Clone)]
pub struct SpeedArgs {
    /// Sequence lengths, comma-separated (seq_q = seq_kv) [default: 256,512,1024 on a CPU adapter
    /// such as llvmpipe, else 512,1024,2048,4096,8192]
    #[arg(long, value_name = "LIST")]
    pub seqs: Option<String>,
    /// Block densities, comma-separated; 1 is the dense baseline, each value < 1 runs every method
    #[arg(long, value_name = "LIST", default_value = "1,0.25,0.1")]
    pub densities: String,
    /// Sparse methods at each density < 1 (random, window, global, sbm, topk, mra; sbm and topk at
    /// element density d; mra with blocks_per_row = round(d x k_blocks)); dense always runs as the baseline
    #[arg(long, value_name = "LIST", default_value = "random")]
    pub methods: String,
    /// mra: modes timed, full (MRA-2; softmax only, entmax cells are recorded as skipped) and/or
    /// sparse (MRA-2-s) [default: full,sparse]
    #[arg(long, value_name = "LIST")]
    pub mra_modes: Option<String>,
    /// Query heads (= kv heads) [default: 4 on a CPU adapter, else 8]
    #[arg(long)]
    pub heads: Option<usize>,
    /// Head dimension
    #[arg(long, default_value_t = 64)]
    pub head_dim: usize,
    /// Batch size
    #[arg(long, default_value_t = 1)]
    pub batch: usize,
    /// Normalisers, comma-separated (softmax, entmax15, sparsemax, entmax:ALPHA)
    #[arg(long, value_name = "LIST", default_value = "softmax,entmax15")]
    pub normalizers: String,
    /// Storage types, comma-separated (f32, f16); `auto` = f32, plus f16 when the adapter has SHADER_F16
    #[arg(long, value_name = "LIST", default_value = "auto")]
    pub dtypes: String,
    /// Kernel paths, comma-separated (fused, three-kernel, auto); unsupported paths are recorded as skipped
    #[arg(long, value_name = "LIST", default_value = "fused,three-kernel")]
    pub paths: String,
    /// Block size of every pattern
    #[arg(long, default_value_t = 32)]
    pub block: u32,
    /// Fused-tile autotuning (times candidate tiles once per problem class, outside the timed
    /// runs): on, off, or auto = off on a CPU adapter (it costs minutes there), else the engine's
    /// default (on unless SPARSE_ATTN_AUTOTUNE=0)
    #[arg(long, value_name = "MODE", default_value = "auto")]
    pub autotune: String,
    /// Fused softmax split-K: key splits per query tile (1 = never split); default: the
    /// planner's choice (splits only when query tiles are too few to fill the GPU)
    #[arg(long, value_name = "N")]
    pub key_splits: Option<u32>,
    /// Warm-up runs per cell
    #[arg(long, default_value_t = 1)]
    pub warmup: usize,
    /// Timed runs per cell (the median is reported)
    #[arg(long, default_value_t = 3)]
    pub repeats: usize,
    /// Seed of the synthetic Q/K/V and of random patterns
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Standard deviation of the synthetic attention scores (Q and K are scaled to it). The
    /// default 0.444 is the unscaled data: flat rows whose 1.5-entmax keeps ~6 % of 1024 keys;
    /// MiniLM's heads have score std 1.4-2.7 and keep 1-5 % of 512 (entmax speed depends on
    /// the support, softmax speed does not)
    #[arg(long, value_name = "STD", default_value_t = SYNTHETIC_SCORE_STD)]
    pub score_std: f32,
    /// Refuse sweeps with more cells than this
    #[arg(long, value_name = "N", default_value_t = 2000)]
    pub max_cells: usize,
    /// Output directory [default: target/attn-bench/speed]
    #[arg(long, value_name = "DIR")]
    pub out: Option<PathBuf>,
}

/// Largest pattern (stored blocks per slice) the bench builds on the host: 2^26 blocks is about
/// 800 MB of pattern arrays.
const MAX_PATTERN_BLOCKS: u64 = 1 << 26;

/// Score std of the unscaled synthetic data: elements of std 2/3, so q·k/√d has std 4/9.
const SYNTHETIC_SCORE_STD: f32 = 4.0 / 9.0;

fn synthetic(shape: (usize, usize, usize, usize), seed: u64) -> Array4<f32> {
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
    Array4::from_shape_simple_fn(shape, || (0..3).map(|_| rng.random::<f32>() * 2.0 - 1.0).sum::<f32>() / 3.0 * 2.0)
}

struct PatternCase {
    method: Method,
    /// The MRA pattern's coarse remainder (MRA methods only).
    mra: Option<Mra>,
    requested_density: f64,
    pattern: BlockPattern,
    build_ms: f64,
    density: f64,
    pairs: u64,
}

#[derive(Clone)]
struct Row {
    seq: usize,
    method: MethodName,
    label: String,
    /// Plot curve (method and variant, e.g. mra-full).
    curve: String,
    normalizer: Normalizer,
    dtype: DType,
    path: ExecPath,
    requested_density: f64,
    density: f64,
    build_ms: f64,
    attention_ms: f64,
    wall_ms: f64,
    gflops: f64,
    timer: &'static str,
    status: &'static str,
    reason: String,
    stage_ms: std::collections::BTreeMap<String, f64>,
    /// The fused tiles that ran, by row class (`tiles_label`); empty for the three-kernel path.
    tiles: String,
    /// Fused entmax: the kernels' branch counts in the last timed run.
    entmax_paths: Option<sparse_attn::EntmaxPaths>,
}

pub fn run(g: &Globals, a: &SpeedArgs) -> BResult<()> {
    let mut a = a.clone();
    if !["auto", "on", "off"].contains(&a.autotune.as_str()) {
        return Err(BenchError::input(format!("--autotune {}: expected auto, on or off", a.autotune)));
    }
    let mut engine = g.engine()?;
    let cpu_adapter = engine.adapter_info().device_type == wgpu::DeviceType::Cpu;
    let seqs_text = a.seqs.clone().unwrap_or_else(|| if cpu_adapter { "256,512,1024" } else { "512,1024,2048,4096,8192" }.to_string());
    a.heads = Some(a.heads.unwrap_or(if cpu_adapter { 4 } else { 8 }));
    let autotune = match a.autotune.as_str() {
        "on" => Some(true),
        "off" => Some(false),
        _ if cpu_adapter => Some(false),
        _ => None,
    };
    if let Some(on) = autotune {
        engine.set_autotune(on);
    }
    let autotune_label = match autotune {
        Some(true) => "on".to_string(),
        Some(false) => "off".to_string(),
        None => format!("engine default ({})", if std::env::var(sparse_attn::gpu::engine::ENV_AUTOTUNE).is_ok_and(|v| v == "0") { "off" } else { "on" }),
    };
    run_with(g, &a, &engine, &seqs_text, &autotune_label)
}

fn run_with(g: &Globals, a: &SpeedArgs, engine: &Engine, seqs_text: &str, autotune_label: &str) -> BResult<()> {
    let heads = a.heads.unwrap_or(8);
    let seqs: Vec<usize> = parse_list("--seqs", seqs_text)?;
    let densities: Vec<f64> = parse_list("--densities", &a.densities)?;
    let names = MethodName::parse_list("--methods", &a.methods)?;
    let normalizers: Vec<Normalizer> = parse_list::<String>("--normalizers", &a.normalizers)?.iter().map(|s| parse_normalizer(s)).collect::<BResult<_>>()?;
    let paths: Vec<ExecPath> = parse_list::<String>("--paths", &a.paths)?.iter().map(|s| parse_path(s)).collect::<BResult<_>>()?;
    check_block(a.block)?;
    for (name, v) in [("--heads", heads), ("--head-dim", a.head_dim), ("--batch", a.batch), ("--repeats", a.repeats)] {
        if v == 0 {
            return Err(BenchError::input(format!("{name} must be at least 1")));
        }
    }
    if !(a.score_std.is_finite() && a.score_std > 0.0) {
        return Err(BenchError::input(format!("--score-std must be finite and > 0, got {}", a.score_std)));
    }
    if let Some(s) = seqs.iter().find(|&&s| s == 0) {
        return Err(BenchError::input(format!("--seqs: sequence length {s} must be at least 1")));
    }
    if let Some(d) = densities.iter().find(|d| !(**d > 0.0 && **d <= 1.0)) {
        return Err(BenchError::input(format!("--densities: {d} must lie in (0, 1]")));
    }
    for n in &names {
        if *n != MethodName::Dense {
            methods::for_density(*n, 0.5, 1024, a.block, a.seed).map_err(|reason| BenchError::input(format!("--methods {}: {reason}", n.as_str())))?;
        }
    }
    let sparse_names: Vec<MethodName> = names.iter().copied().filter(|n| *n != MethodName::Dense).collect();
    if a.mra_modes.is_some() && !names.contains(&MethodName::Mra) {
        return Err(BenchError::input("--mra-modes applies to method mra, which is not in --methods"));
    }
    let mut mra_modes: Vec<MraMode> = Vec::new();
    for m in parse_list::<String>("--mra-modes", a.mra_modes.as_deref().unwrap_or("full,sparse"))? {
        let m = methods::MraModeArg::from_str(&m, true).map_err(|_| BenchError::input(format!("--mra-modes: unknown mode `{m}` (full, sparse)")))?.mode();
        if !mra_modes.contains(&m) {
            mra_modes.push(m);
        }
    }
    // Method settings at one density: MRA once per mode.
    let at_density = |n: MethodName, d: f64, seq: usize| -> BResult<Vec<Method>> {
        let m = methods::for_density(n, d, seq, a.block, a.seed).map_err(BenchError::input)?;
        Ok(match m {
            Method::Mra { blocks_per_row, .. } => mra_modes.iter().map(|&mode| Method::Mra { blocks_per_row, mode }).collect(),
            m => vec![m],
        })
    };
    let sparse_densities: Vec<f64> = densities.iter().copied().filter(|d| *d < 1.0).collect();

    let dtypes: Vec<DType> = if a.dtypes.trim() == "auto" {
        if engine.capabilities().f16 {
            vec![DType::F32, DType::F16]
        } else {
            vec![DType::F32]
        }
    } else {
        let d: Vec<DType> = parse_list::<String>("--dtypes", &a.dtypes)?.iter().map(|s| parse_dtype(s)).collect::<BResult<_>>()?;
        if d.contains(&DType::F16) && !engine.capabilities().f16 {
            return Err(BenchError::input(format!(
                "--dtypes f16: adapter `{}` lacks SHADER_F16 (or {} is set)",
                engine.adapter_info().name,
                sparse_attn::gpu::device::ENV_NO_F16
            )));
        }
        d
    };
    let settings_per_density: usize = sparse_names.iter().map(|n| if *n == MethodName::Mra { mra_modes.len() } else { 1 }).sum();
    let patterns_per_seq = 1 + settings_per_density * sparse_densities.len();
    let per_pattern = normalizers.len() * dtypes.len() * paths.len();
    let cells = seqs.len() * patterns_per_seq * per_pattern;
    if cells > a.max_cells {
        return Err(BenchError::input(format!(
            "sweep too big: {} seqs x {patterns_per_seq} patterns x {} normalizers x {} dtypes x {} paths = {cells} cells exceed --max-cells {}",
            seqs.len(),
            normalizers.len(),
            dtypes.len(),
            paths.len(),
            a.max_cells
        )));
    }
    // Every size must fit the adapter: plan the largest (dense) problem of each seq up front.
    for &seq in &seqs {
        let shape = AttentionShape::new(a.batch, heads, seq, a.head_dim);
        shape.validate().map_err(|e| BenchError::input(format!("sweep too big: seq {seq}: {e}")))?;
        let blocks = (seq.div_ceil(a.block as usize) as u128).pow(2);
        if blocks > MAX_PATTERN_BLOCKS as u128 {
            return Err(BenchError::input(format!(
                "sweep too big: seq {seq} at block {} makes a dense pattern of {blocks} blocks, more than the bench's limit of {MAX_PATTERN_BLOCKS} (use a larger --block or shorter --seqs)",
                a.block
            )));
        }
        let dense = Dense::new().with_blocks(a.block, a.block).build(&shape)?;
        for &dtype in &dtypes {
            // The three-kernel plan (no tile tuning) shows whether the sizes fit the adapter.
            let opts = AttentionOptions { normalizer: normalizers[0], dtype, path: ExecPath::ThreeKernel, ..Default::default() };
            if let Err(e) = engine.plan(&shape, &dense, &opts) {
                return Err(match e {
                    Error::Limit { limit, required, available } => BenchError::input(format!(
                        "sweep too big for adapter `{}`: seq {seq} ({}) needs {limit} >= {required}, the adapter has {available}",
                        engine.adapter_info().name,
                        dtype.label()
                    )),
                    other => BenchError::from(other).context(format!("seq {seq} ({})", dtype.label())),
                });
            }
        }
        let tensor_bytes = (a.batch * heads * seq * a.head_dim) as u64 * 4;
        let max_buffer = engine.device().limits().max_buffer_size;
        if tensor_bytes > max_buffer {
            return Err(BenchError::input(format!(
                "sweep too big for adapter `{}`: seq {seq} needs a {tensor_bytes}-byte Q buffer, max_buffer_size is {max_buffer}",
                engine.adapter_info().name
            )));
        }
    }
    let out = a.out.clone().unwrap_or_else(|| default_out("speed"));
    create_out_dir(&out)?;
    let dtype_label = dtypes.iter().map(|d| d.label()).collect::<Vec<_>>().join(",");
    let prov = Provenance::new(Some(engine), "gpu", &dtype_label, a.seed);

    let started = Instant::now();
    let bar = progress(g, cells as u64, "speed");
    let mut rows: Vec<Row> = Vec::new();
    for (si, &seq) in seqs.iter().enumerate() {
        let shape = AttentionShape::new(a.batch, heads, seq, a.head_dim);
        let dims = (a.batch, heads, seq, a.head_dim);
        let seed = a.seed.wrapping_add(1000 * si as u64);
        // Scores scale with the product of the Q and K scales.
        let qk_scale = (a.score_std / SYNTHETIC_SCORE_STD).sqrt();
        let (q, k, v) = (synthetic(dims, seed) * qk_scale, synthetic(dims, seed + 1) * qk_scale, synthetic(dims, seed + 2));
        let mut cases: Vec<PatternCase> = Vec::new();
        let models = methods::Models::default();
        let mut configs: Vec<(Method, f64)> = vec![(Method::Dense, 1.0)];
        for &d in &sparse_densities {
            for n in &sparse_names {
                for m in at_density(*n, d, seq)? {
                    configs.push((m, d));
                }
            }
        }
        for (method, requested_density) in configs {
            bar.set_message(format!("seq {seq}: building {}", method.label()));
            let input = methods::BuildInput { q: &q, k: &k, v: Some(&v), shape, block: a.block, layer_index: 0, text: "", models: &models };
            let mut times = Vec::new();
            let mut pattern = None;
            let mut mra = None;
            let what = |e: Error| BenchError::from(e).context(format!("seq {seq}: building {}", method.label()));
            for _ in 0..3 {
                let t = Instant::now();
                // MRA: block means of Q, K, V + low-resolution scores + selection + row terms on
                // the GPU, pattern and remainder read back.
                let p = match method.build_mra(&input, Some(engine)) {
                    Some(m) => {
                        let m = m.map_err(what)?;
                        times.push(ms_since(t));
                        let p = m.pattern.clone();
                        mra = Some(m);
                        p
                    }
                    None => {
                        let p = method.build(&input).map_err(what)?;
                        times.push(ms_since(t));
                        p
                    }
                };
                pattern = Some(p);
            }
            let pattern = pattern.expect("built");
            let slices = shape.slices();
            let per_slice_blocks: f64 =
                (0..slices).map(|s| pattern.slice_nnz(pattern.pattern_slice(s)) as f64).sum::<f64>() / slices as f64;
            let density = per_slice_blocks / (pattern.q_blocks() as f64 * pattern.k_blocks() as f64);
            let pairs: u64 = (0..slices).map(|s| pattern.allowed_pairs(pattern.pattern_slice(s))).sum();
            cases.push(PatternCase { method, mra, requested_density, pattern, build_ms: median(&times), density, pairs });
        }
        for case in &cases {
            for &normalizer in &normalizers {
                for &dtype in &dtypes {
                    for &path in &paths {
                        bar.set_message(format!("seq {seq}: {} {} {} {}", case.method.label(), normalizer.label(), dtype.label(), path.label()));
                        let mut row = Row {
                            seq,
                            method: case.method.name(),
                            label: case.method.label(),
                            curve: case.method.curve(),
                            normalizer,
                            dtype,
                            path,
                            requested_density: case.requested_density,
                            density: case.density,
                            build_ms: case.build_ms,
                            attention_ms: f64::NAN,
                            wall_ms: f64::NAN,
                            gflops: f64::NAN,
                            timer: "",
                            status: "ok",
                            reason: String::new(),
                            stage_ms: Default::default(),
                            tiles: String::new(),
                            entmax_paths: None,
                        };
                        match time_cell(engine, &q, &k, &v, &case.pattern, case.mra.as_ref(), AttentionOptions { normalizer, dtype, path, key_splits: a.key_splits, ..Default::default() }, a.warmup, a.repeats) {
                            Ok((t, tiles, entmax_paths)) => {
                                row.tiles = tiles;
                                row.entmax_paths = entmax_paths;
                                row.attention_ms = t.median_ms();
                                row.wall_ms = median(&t.wall_ms);
                                row.timer = if t.gpu_ms.is_empty() { "wall-clock" } else { "gpu-timestamps" };
                                row.gflops = 4.0 * case.pairs as f64 * a.head_dim as f64 / (row.attention_ms * 1e6);
                                row.stage_ms = t.stage_ms;
                            }
                            Err(Error::Unsupported(reason)) => {
                                row.status = "skipped";
                                row.reason = reason;
                            }
                            Err(e) => {
                                row.status = "failed";
                                row.reason = e.to_string();
                            }
                        }
                        tracing::info!(
                            seq,
                            pattern = %row.label,
                            normalizer = %normalizer.label(),
                            dtype = dtype.label(),
                            path = path.label(),
                            attention_ms = row.attention_ms,
                            status = row.status,
                            elapsed_s = started.elapsed().as_secs_f64(),
                            "speed cell"
                        );
                        rows.push(row);
                        bar.inc(1);
                    }
                }
            }
        }
    }
    bar.finish_and_clear();
    let elapsed_s = started.elapsed().as_secs_f64();

    // CSV + JSON.
    let mut csv = format!("{SPEED_COLUMNS},label,requested_density,status,reason,timer,wall_ms,batch,tiles,entmax_paths,{}\n", Provenance::csv_header());
    let mut json_rows: Vec<Value> = Vec::new();
    for r in &rows {
        csv.push_str(
            &[
                r.method.as_str().to_string(),
                r.path.label().to_string(),
                r.normalizer.label(),
                r.dtype.label().to_string(),
                r.seq.to_string(),
                heads.to_string(),
                a.head_dim.to_string(),
                a.block.to_string(),
                num(r.density),
                num(r.build_ms),
                num(r.attention_ms),
                num(r.gflops),
                csv_cell(&r.label),
                num(r.requested_density),
                r.status.to_string(),
                csv_cell(&r.reason),
                r.timer.to_string(),
                num(r.wall_ms),
                a.batch.to_string(),
                csv_cell(&r.tiles),
                csv_cell(&r.entmax_paths.map(|p| p.to_string()).unwrap_or_default()),
                prov.csv_cells(),
            ]
            .join(","),
        );
        csv.push('\n');
        json_rows.push(json!({
            "method": r.method.as_str(), "path": r.path.label(), "normalizer": r.normalizer.label(), "dtype": r.dtype.label(),
            "seq": r.seq, "heads": heads, "head_dim": a.head_dim, "block": a.block, "density": r.density,
            "build_ms": r.build_ms, "attention_ms": jnum(r.attention_ms), "gflops": jnum(r.gflops),
            "label": r.label, "requested_density": r.requested_density, "status": r.status,
            "reason": if r.reason.is_empty() { Value::Null } else { json!(r.reason) },
            "timer": r.timer, "wall_ms": jnum(r.wall_ms), "stage_ms": r.stage_ms, "batch": a.batch, "tiles": r.tiles,
            "entmax_paths": r.entmax_paths,
        }));
    }
    let csv_path = out.join("speed.csv");
    write_file(&csv_path, &csv)?;

    // Plots.
    let ok = |r: &&Row| r.status == "ok";
    let plot_dtype = DType::F32;
    let plot_path = paths
        .iter()
        .copied()
        .find(|p| rows.iter().filter(ok).any(|r| r.path == *p && r.dtype == plot_dtype))
        .unwrap_or(paths[0]);
    let mut by_seq: Vec<Series> = Vec::new();
    let mut curve_keys: Vec<(String, f64, Normalizer)> = Vec::new();
    for r in rows.iter().filter(ok).filter(|r| r.dtype == plot_dtype && r.path == plot_path) {
        let key = (r.curve.clone(), r.requested_density, r.normalizer);
        if !curve_keys.contains(&key) {
            curve_keys.push(key);
        }
    }
    for (m, d, n) in &curve_keys {
        let pts: Vec<(f64, f64)> = rows
            .iter()
            .filter(ok)
            .filter(|r| r.dtype == plot_dtype && r.path == plot_path && r.curve == *m && r.requested_density == *d && r.normalizer == *n)
            .map(|r| (r.seq as f64, r.attention_ms))
            .collect();
        let name = if m == "dense" { "dense".to_string() } else { format!("{m} d={d}") };
        by_seq.push(Series { name: format!("{name} {}", n.label()), points: pts, labels: Vec::new(), thin: false });
    }
    let max_seq = *seqs.iter().max().unwrap_or(&0);
    let mut by_density: Vec<Series> = Vec::new();
    let mut density_methods: Vec<String> = Vec::new();
    for r in &rows {
        if (r.method != MethodName::Dense || sparse_names.is_empty()) && !density_methods.contains(&r.curve) {
            density_methods.push(r.curve.clone());
        }
    }
    for m in &density_methods {
        for &n in &normalizers {
            for &p in &paths {
                let mut pts: Vec<(f64, f64)> = rows
                    .iter()
                    .filter(ok)
                    .filter(|r| r.seq == max_seq && r.dtype == plot_dtype && r.path == p && r.normalizer == n && (r.curve == *m || r.method == MethodName::Dense))
                    .map(|r| (r.density, r.attention_ms))
                    .collect();
                pts.sort_by(|x, y| x.0.total_cmp(&y.0));
                if !pts.is_empty() {
                    by_density.push(Series { name: format!("{m} {} {}", n.label(), p.label()), points: pts, labels: Vec::new(), thin: false });
                }
            }
        }
    }
    let timer = rows.iter().find(|r| r.status == "ok").map(|r| r.timer).unwrap_or("-");
    let panels = vec![
        Panel {
            title: format!("time vs sequence length ({}, {}, log-log)", plot_dtype.label(), plot_path.label()),
            x_label: "sequence length (tokens)".into(),
            y_label: format!("attention time, ms (median, {timer})"),
            log_x: true,
            log_y: true,
            x_range: None,
            y_range: None,
            series: by_seq,
            legend_upper: true,
            x_ticks: Some(seqs.iter().map(|&s| s as f64).collect()),
        },
        Panel {
            title: format!("time vs block density (seq {max_seq}, {})", plot_dtype.label()),
            x_label: "block density (stored blocks / all blocks)".into(),
            y_label: format!("attention time, ms (median, {timer})"),
            log_x: true,
            log_y: true,
            x_range: None,
            y_range: None,
            series: by_density,
            legend_upper: true,
            x_ticks: None,
        },
    ];
    let title = format!(
        "attn-bench speed: {} heads x head_dim {}, batch {}, block {}, synthetic Q/K/V (score std {:.3})",
        heads, a.head_dim, a.batch, a.block, a.score_std
    );
    let subtitle = format!("adapter {} | attn-bench {} git {} | {}", prov.adapter_label(), prov.crate_version, prov.git_revision, prov.date_utc);
    let mut svgs = Vec::new();
    let all = out.join("speed.svg");
    plot::draw(&all, &title, &subtitle, &panels, 2, &prov)?;
    svgs.push(all);
    for (panel, file) in panels.iter().zip(["speed_vs_seq.svg", "speed_vs_density.svg"]) {
        let p = out.join(file);
        plot::draw(&p, &title, &subtitle, std::slice::from_ref(panel), 1, &prov)?;
        svgs.push(p);
    }

    let skipped = rows.iter().filter(|r| r.status == "skipped").count();
    let failed: Vec<&Row> = rows.iter().filter(|r| r.status == "failed").collect();
    let json_path = out.join("speed.json");
    let report = json!({
        "provenance": prov,
        "config": {
            "seqs": seqs, "densities": densities, "methods": names.iter().map(|m| m.as_str()).collect::<Vec<_>>(),
            "heads": heads, "head_dim": a.head_dim, "batch": a.batch, "block": a.block,
            "normalizers": normalizers.iter().map(|n| n.label()).collect::<Vec<_>>(),
            "dtypes": dtypes.iter().map(|d| d.label()).collect::<Vec<_>>(), "paths": paths.iter().map(|p| p.label()).collect::<Vec<_>>(),
            "warmup": a.warmup, "repeats": a.repeats, "seed": a.seed, "autotune": autotune_label, "score_std": a.score_std,
        },
        "columns": SPEED_COLUMNS.split(',').collect::<Vec<_>>(),
        "rows": json_rows,
        "cells": rows.len(), "skipped": skipped, "failed": failed.len(),
        "elapsed_s": elapsed_s,
        "notes": {
            "attention_ms": "median of the timed runs of one call (GPU timestamps summed over passes when the adapter has them, else wall clock submit-to-idle)",
            "build_ms": "median of 3 pattern builds (mra: block means of Q/K/V, low-resolution scores, the block selection and the remainder's row terms on the GPU, including the read-back of the pattern and remainder; the remainder upload is outside both times; other methods build on the host)",
            "mra": "mra at density d: blocks_per_row = round(d x k_blocks) (priors included in the budget); mode full = MRA-2 (coarse remainder merged into the softmax; entmax cells are skipped), sparse = MRA-2-s",
            "density": "the pattern's block density (stored blocks / all blocks, mean over slices)",
            "gflops": "4 * computed pairs * head_dim / attention time",
        },
        "files": {"csv": csv_path.display().to_string(), "svg": svgs.iter().map(|p| p.display().to_string()).collect::<Vec<_>>()},
    });
    write_json(&json_path, &report)?;

    if g.human() {
        println!("{title}");
        println!("{subtitle}");
        println!(
            "{:<30} {:<12} {:<9} {:<5} {:>6} {:>8} {:>9} {:>11} {:>8}  status",
            "method", "path", "norm", "dtype", "seq", "density", "build_ms", "attn_ms", "GFLOP/s"
        );
        for r in &rows {
            println!(
                "{:<30} {:<12} {:<9} {:<5} {:>6} {:>8.4} {:>9.3} {:>11.3} {:>8.2}  {}",
                r.label,
                r.path.label(),
                r.normalizer.label(),
                r.dtype.label(),
                r.seq,
                r.density,
                r.build_ms,
                r.attention_ms,
                r.gflops,
                if r.status == "ok" { "ok".to_string() } else { format!("{}: {}", r.status, r.reason) }
            );
        }
        println!(
            "{} cells ({} skipped, {} failed) in {elapsed_s:.1} s; wrote {}, {}, {}",
            rows.len(),
            skipped,
            failed.len(),
            csv_path.display(),
            json_path.display(),
            svgs[0].display()
        );
    }
    g.print_json(&json!({"provenance": report["provenance"], "config": report["config"], "rows": report["rows"], "elapsed_s": elapsed_s, "files": report["files"]}))?;
    if let Some(f) = failed.first() {
        return Err(BenchError::runtime(format!(
            "{} of {} cells failed (first: {} {} seq {}: {}); results written to {}",
            failed.len(),
            rows.len(),
            f.label,
            f.path.label(),
            f.seq,
            f.reason,
            json_path.display()
        )));
    }
    Ok(())
}

#[allow(clippy::too_many_arguments)]
fn time_cell(
    engine: &Engine,
    q: &Array4<f32>,
    k: &Array4<f32>,
    v: &Array4<f32>,
    pattern: &BlockPattern,
    mra: Option<&Mra>,
    opts: AttentionOptions,
    warmup: usize,
    repeats: usize,
) -> Result<(sparse_attn::RunTimes, String, Option<sparse_attn::EntmaxPaths>), Error> {
    let prepared = match mra {
        Some(m) => engine.prepare_attention_mra(q, k, v, m, &opts)?,
        None => engine.prepare_attention(q, k, v, pattern, &opts)?,
    };
    let times = prepared.time(warmup, repeats)?;
    Ok((times, tiles_label(prepared.plan()), prepared.entmax_paths()?))
}

/// The fused tiles of a plan as `wg/tq/rq/kc` plus `/c<keys>` (score cache) or `/p<slots>`
/// (entmax pools), one per row class as `rows<=N:tile` joined by `;` when the rows are split;
/// empty for the three-kernel path.
fn tiles_label(plan: &sparse_attn::gpu::plan::Plan) -> String {
    let tile = |t: &sparse_attn::gpu::tiles::FusedTile| {
        let kind = if t.rc > 0 {
            format!("/c{}", t.rc)
        } else if t.cap > 0 {
            format!("/p{}", t.cap)
        } else {
            String::new()
        };
        format!("{}/{}/{}/{}{kind}", t.wg, t.tq, t.rq, t.kc)
    };
    match plan.row_classes.as_slice() {
        [] => String::new(),
        [only] => tile(&only.tile),
        classes => classes.iter().map(|c| format!("rows<={}:{}", c.max_blocks, tile(&c.tile))).collect::<Vec<_>>().join(";"),
    }
}
