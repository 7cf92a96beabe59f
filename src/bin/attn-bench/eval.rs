//! Runs one method on one (text, layer) case and measures it: pattern build time, attention time
//! (GPU or CPU reference), recall of the exact entmax-1.5 support, sparsity, output error.

use crate::common::{ms_since, BResult, BenchError};
use crate::dataset::LayerCase;
use crate::methods::{BuildInput, Method, Models};
use ndarray::{Array4, Axis};
use sparse_attn::metrics::{block_sparsity, element_sparsity, output_error, recall};
use sparse_attn::patterns::mra::{reference as mra_reference, Mra};
use sparse_attn::{reference, AttentionOptions, BlockPattern, Engine, ExecPath, Normalizer};
use std::time::Instant;

/// Where the attention is computed.
pub enum Runner<'e> {
    Gpu { engine: &'e Engine, opts: AttentionOptions, warmup: usize, repeats: usize },
    Cpu { normalizer: Normalizer },
}

impl Runner<'_> {
    pub fn normalizer(&self) -> Normalizer {
        match self {
            Runner::Gpu { opts, .. } => opts.normalizer,
            Runner::Cpu { normalizer } => *normalizer,
        }
    }
}

/// Extra measurements, off by default (they cost CPU time).
#[derive(Clone, Copy, Debug, Default)]
pub struct Extras {
    /// Mean support size per query of the computed (pattern-restricted) entmax rows.
    pub support: bool,
    /// Max |O − O_ref| against the CPU reference on the same pattern.
    pub reference: bool,
}

#[derive(Clone, Debug)]
pub struct HeadMetrics {
    pub recall: f64,
    pub element_sparsity: f64,
    pub block_sparsity: f64,
    /// ‖O − O_exact‖/‖O_exact‖ against exact dense attention (NaN when not computed).
    pub output_error: f64,
    pub mean_support: Option<f64>,
    pub gold_mean_support: f64,
}

pub struct Evaluation {
    pub heads: Vec<HeadMetrics>,
    pub build_ms: f64,
    /// Median time of one call over all heads.
    pub attention_ms: f64,
    /// `gpu-timestamps`, `wall-clock` or `cpu-reference`.
    pub timer: &'static str,
    pub stage_ms: std::collections::BTreeMap<String, f64>,
    pub o: Array4<f32>,
    pub max_abs_error_vs_reference: Option<f64>,
    pub stored_blocks: usize,
    pub pattern_slices: u32,
}

impl Evaluation {
    pub fn mean_of(&self, f: impl Fn(&HeadMetrics) -> f64) -> f64 {
        crate::common::mean(&self.heads.iter().map(f).collect::<Vec<_>>())
    }
    pub fn mean_support(&self) -> Option<f64> {
        let v: Vec<f64> = self.heads.iter().filter_map(|h| h.mean_support).collect();
        (!v.is_empty()).then(|| crate::common::mean(&v))
    }
}

pub fn build(case: &LayerCase, method: &Method, block: u32, models: &Models) -> BResult<(BlockPattern, f64)> {
    let input = BuildInput { q: &case.q, k: &case.k, v: Some(&case.v), shape: case.shape, block, layer_index: case.layer_index, text: &case.text, models };
    let t = Instant::now();
    let pattern = method.build(&input).map_err(|e| BenchError::from(e).context(format!("building {}", method.label())))?;
    Ok((pattern, ms_since(t)))
}

/// Per-row support sizes (probabilities > 0) of one pattern, mean per head, on the CPU.
fn cpu_support(case: &LayerCase, pattern: &BlockPattern, normalizer: Normalizer) -> Vec<f64> {
    let scale = case.shape.default_scale() as f64;
    (0..case.shape.heads)
        .map(|h| {
            let mask = pattern.to_dense_mask(pattern.pattern_slice(h));
            let qh = case.q.index_axis(Axis(0), 0).index_axis_move(Axis(0), h);
            let kh = case.k.index_axis(Axis(0), 0).index_axis_move(Axis(0), h);
            let p = reference::probabilities(&qh, &kh, &mask, scale, normalizer);
            p.iter().filter(|&&x| x > 0.0).count() as f64 / case.shape.seq_q as f64
        })
        .collect()
}

pub fn evaluate(case: &LayerCase, method: &Method, block: u32, models: &Models, runner: &Runner<'_>, extras: Extras) -> BResult<Evaluation> {
    if let Method::LowRank { rank, subset } = *method {
        return evaluate_lowrank(case, rank, subset, block, models, runner, extras.reference).map_err(|e| e.context(method.label()));
    }
    if let Method::Mra { .. } = method {
        let input = BuildInput { q: &case.q, k: &case.k, v: Some(&case.v), shape: case.shape, block, layer_index: case.layer_index, text: &case.text, models };
        // The low-resolution stage runs on the GPU when the runner has one.
        let engine = match runner {
            Runner::Gpu { engine, .. } => Some(*engine),
            Runner::Cpu { .. } => None,
        };
        let t = Instant::now();
        let mra = method.build_mra(&input, engine).expect("mra").map_err(|e| BenchError::from(e).context(format!("building {}", method.label())))?;
        let build_ms = ms_since(t);
        return evaluate_built(case, &mra.pattern, Some(&mra), build_ms, runner, extras).map_err(|e| e.context(method.label()));
    }
    let (pattern, build_ms) = build(case, method, block, models)?;
    evaluate_pattern(case, &pattern, build_ms, runner, extras).map_err(|e| e.context(method.label()))
}

pub fn evaluate_pattern(case: &LayerCase, pattern: &BlockPattern, build_ms: f64, runner: &Runner<'_>, extras: Extras) -> BResult<Evaluation> {
    evaluate_built(case, pattern, None, build_ms, runner, extras)
}

/// A block pattern, or (with `mra`) an MRA pattern and its coarse remainder: MRA-2 runs
/// `attention_mra` on the GPU and the MRA reference on the CPU; recall and sparsity are the
/// pattern's (the selected blocks).
fn evaluate_built(case: &LayerCase, pattern: &BlockPattern, mra: Option<&Mra>, build_ms: f64, runner: &Runner<'_>, extras: Extras) -> BResult<Evaluation> {
    let normalizer = runner.normalizer();
    // The exact-or-reference output of this pattern (the CPU f64 reference).
    let reference_out = |normalizer: Normalizer| -> sparse_attn::Result<Array4<f32>> {
        match mra {
            Some(m) => mra_reference::attention(&case.q, &case.k, &case.v, m, normalizer, None),
            None => reference::attention(&case.q, &case.k, &case.v, pattern, normalizer),
        }
    };
    let entmax = normalizer.alpha().is_some();
    let mut stage_ms = Default::default();
    let (o, attention_ms, timer, support) = match runner {
        Runner::Gpu { engine, opts, warmup, repeats } => {
            let prepared = match mra {
                Some(m) => engine.prepare_attention_mra(&case.q, &case.k, &case.v, m, opts)?,
                None => engine.prepare_attention(&case.q, &case.k, &case.v, pattern, opts)?,
            };
            let times = prepared.time(*warmup, (*repeats).max(1))?;
            stage_ms = times.stage_ms.clone();
            let timer = if times.gpu_ms.is_empty() { "wall-clock" } else { "gpu-timestamps" };
            let o = prepared.run_and_read(false, false)?.o;
            drop(prepared);
            let support = if extras.support && entmax {
                let stats_opts = AttentionOptions { path: ExecPath::ThreeKernel, return_row_stats: true, ..*opts };
                let out = engine.attention_with(&case.q, &case.k, &case.v, pattern, &stats_opts)?;
                out.row_stats.map(|s| s.support.outer_iter().map(|row| row.iter().map(|&x| x as f64).sum::<f64>() / row.len().max(1) as f64).collect::<Vec<_>>())
            } else {
                None
            };
            (o, times.median_ms(), timer, support)
        }
        Runner::Cpu { normalizer } => {
            let t = Instant::now();
            let o = reference_out(*normalizer)?;
            let ms = ms_since(t);
            let support = (extras.support && entmax).then(|| cpu_support(case, pattern, *normalizer));
            (o, ms, "cpu-reference", support)
        }
    };
    let max_abs_error_vs_reference = if extras.reference {
        let want = reference_out(normalizer)?;
        Some(o.iter().zip(want.iter()).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max))
    } else {
        None
    };
    let heads = (0..case.shape.heads)
        .map(|h| {
            let ps = pattern.pattern_slice(h);
            let output_error = match &case.exact {
                Some(exact) => output_error(&o.index_axis(Axis(0), 0).index_axis(Axis(0), h), &exact.index_axis(Axis(0), 0).index_axis(Axis(0), h)),
                None => f64::NAN,
            };
            HeadMetrics {
                recall: recall(pattern, ps, &case.gold[h]),
                element_sparsity: element_sparsity(pattern, ps, false),
                block_sparsity: block_sparsity(pattern, ps, false),
                output_error,
                mean_support: support.as_ref().map(|s| s[h]),
                gold_mean_support: case.gold[h].mean_support(),
            }
        })
        .collect();
    Ok(Evaluation {
        heads,
        build_ms,
        attention_ms,
        timer,
        stage_ms,
        o,
        max_abs_error_vs_reference,
        stored_blocks: pattern.nnz(),
        pattern_slices: pattern.slices(),
    })
}

/// Full-row low-rank reconstruction (`Method::LowRank`): no block pattern, so the measures mean:
/// - `recall`: share of the exact entmax-1.5 support where entmax-1.5 of the *reconstructed* score
///   row is positive (the support the reconstruction predicts, whatever the run's normaliser);
/// - `element_sparsity`: 1 − m/n, the share of scores not computed exactly;
/// - `block_sparsity`: 1 − (key blocks holding a subset position)/(key blocks), at `block`;
/// - `output_error`: O = normaliser(reconstructed row)·V against exact dense attention;
/// - `mean_support`: keys with p > 0 per query of entmax-1.5 over the reconstructed row.
///
/// `build_ms` is the plan (subset operator) time; attention runs the GPU low-rank kernels (f32,
/// wall clock) or the CPU f64 reference.
/// With `reference`, also the max |O − O_ref| against the CPU f64 low-rank reference.
pub fn evaluate_lowrank(case: &LayerCase, rank: usize, subset: usize, block: u32, models: &Models, runner: &Runner<'_>, reference: bool) -> BResult<Evaluation> {
    use sparse_attn::lowrank::{self, LowRankConfig};
    let normalizer = runner.normalizer();
    let model = models.lowrank.as_ref().ok_or_else(|| BenchError::runtime("lowrank needs a model (none was loaded)"))?.for_text(&case.text)?;
    let n = case.shape.seq_kv;
    let t = Instant::now();
    let plan = model.plan(&LowRankConfig::new(rank, subset), n)?;
    let build_ms = ms_since(t);
    let (q, k, v) = (case.q.view(), case.k.view(), case.v.view());
    let (o, scores, attention_ms, timer) = match runner {
        Runner::Gpu { engine, warmup, repeats, .. } => {
            let gpu = engine.lowrank()?;
            for _ in 0..*warmup {
                gpu.attention(engine, &plan, &q, &k, &v, normalizer, false)?;
            }
            let mut times = Vec::new();
            for _ in 0..(*repeats).max(1) {
                let t = Instant::now();
                gpu.attention(engine, &plan, &q, &k, &v, normalizer, false)?;
                times.push(ms_since(t));
            }
            times.sort_by(f64::total_cmp);
            let out = gpu.attention(engine, &plan, &q, &k, &v, normalizer, true)?;
            let scores = out.scores.ok_or_else(|| BenchError::runtime("lowrank GPU: no scores read back"))?;
            (out.o, scores, times[times.len() / 2], "wall-clock")
        }
        Runner::Cpu { normalizer } => {
            let t = Instant::now();
            let o = lowrank::attention(&plan, &q, &k, &v, *normalizer)?;
            let ms = ms_since(t);
            (o, lowrank::reconstruct_scores(&plan, &q, &k)?, ms, "cpu-reference")
        }
    };
    let max_abs_error_vs_reference = if reference {
        let want = lowrank::attention(&plan, &q, &k, &v, normalizer)?;
        Some(o.iter().zip(want.iter()).map(|(a, b)| (a - b).abs() as f64).fold(0.0, f64::max))
    } else {
        None
    };
    let b = block as usize;
    let k_blocks = n.div_ceil(b);
    let mut subset_blocks: Vec<usize> = plan.subset().iter().map(|&j| j / b).collect();
    subset_blocks.dedup();
    let block_sparsity = 1.0 - subset_blocks.len() as f64 / k_blocks as f64;
    let element_sparsity = 1.0 - plan.subset().len() as f64 / n as f64;
    let heads = (0..case.shape.heads)
        .map(|h| {
            let gold = &case.gold[h];
            let (mut hit, mut support) = (0usize, 0usize);
            for i in 0..case.shape.seq_q {
                let row: Vec<f64> = scores.slice(ndarray::s![0, h, i, ..]).iter().map(|&x| x as f64).collect();
                let p = reference::entmax15(&row);
                support += p.iter().filter(|&&x| x > 0.0).count();
                hit += gold.row(i).iter().filter(|&&j| p[j as usize] > 0.0).count();
            }
            let output_error = match &case.exact {
                Some(exact) => output_error(&o.index_axis(Axis(0), 0).index_axis(Axis(0), h), &exact.index_axis(Axis(0), 0).index_axis(Axis(0), h)),
                None => f64::NAN,
            };
            HeadMetrics {
                recall: if gold.total() == 0 { 1.0 } else { hit as f64 / gold.total() as f64 },
                element_sparsity,
                block_sparsity,
                output_error,
                mean_support: Some(support as f64 / case.shape.seq_q.max(1) as f64),
                gold_mean_support: gold.mean_support(),
            }
        })
        .collect();
    Ok(Evaluation {
        heads,
        build_ms,
        attention_ms,
        timer,
        stage_ms: Default::default(),
        o,
        max_abs_error_vs_reference,
        stored_blocks: 0,
        pattern_slices: 0,
    })
}
