//! The method registry: every pattern method the bench knows, its flags, its knob sweep (pareto)
//! and its density mapping (speed). Adding a method (mra, sbm, topk, lowrank, ...) means one
//! variant of [`MethodName`] and one arm in each `match` below (`spec`, `from_flags`, `sweep`,
//! `for_density`, `Method::build` / `describe`). Methods that read a fitted model get it through
//! [`Models`] (loaded once per run by [`Models::load`]).

use crate::common::{parse_list, BResult, BenchError};
use clap::{Args, ValueEnum};
use ndarray::Array4;
use sparse_attn::patterns::mra::{Mra, MraConfig, MraMode};
use sparse_attn::patterns::sbm::{Density, Sbm, SbmConfig, SbmLayer, SbmModel};
use sparse_attn::patterns::sparsefinder::{Sparsefinder, SparsefinderModel, Threshold, Variant};
use sparse_attn::patterns::topk::{LinearScorerModel, Scorer, TopK};
use sparse_attn::patterns::{Dense, GlobalTokens, RandomBlocks, Window};
use sparse_attn::{AttentionShape, BlockPattern, Normalizer};
use sparse_attn::lowrank::{LowRankConfig, LowRankFitter, LowRankModel, LowRankPattern};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// Method names as the CLI spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, ValueEnum)]
pub enum MethodName {
    /// Every pair (the exact baseline).
    Dense,
    /// Symmetric sliding window of `--width` tokens.
    Window,
    /// Global tokens: the first `--first` and last `--last` tokens see and are seen by all.
    Global,
    /// Seeded random blocks at block density `--density` (synthetic; for speed sweeps).
    Random,
    /// Sparsefinder (Treviso et al. 2022): learned low-dim projections predict the entmax graph.
    Sparsefinder,
    /// SBM-Transformer (Cho et al. 2022): a graph sampled from a stochastic block model of Q/K.
    Sbm,
    /// Top-k token selection (Pietruszka et al. 2022): the k best-scored keys plus a window and
    /// first/last tokens.
    Topk,
    /// Low-rank reconstruction (Bhojanapalli et al. 2021): `--subset` exact scores per query, the
    /// rest of the row estimated in a fitted rank-`--rank` eigenbasis; full-row attention (no
    /// block pattern).
    Lowrank,
    /// Low-rank pattern predictor: the key blocks where the reconstructed rows hold the most mass,
    /// at block density `--density`, then computed exactly by the engine.
    LowrankPattern,
    /// MRA (Zeng et al. 2022): block means give low-resolution scores; the top `--blocks-per-row`
    /// × q_blocks blocks (plus the diagonal and first block row/column) are computed exactly;
    /// `--mode full` (MRA-2, softmax only) merges every other block's coarse estimate into the
    /// softmax, `--mode sparse` (MRA-2-s) drops them.
    Mra,
}

impl MethodName {
    pub fn as_str(self) -> &'static str {
        match self {
            MethodName::Dense => "dense",
            MethodName::Window => "window",
            MethodName::Global => "global",
            MethodName::Random => "random",
            MethodName::Sparsefinder => "sparsefinder",
            MethodName::Sbm => "sbm",
            MethodName::Topk => "topk",
            MethodName::Lowrank => "lowrank",
            MethodName::LowrankPattern => "lowrank-pattern",
            MethodName::Mra => "mra",
        }
    }

    pub fn parse(s: &str) -> BResult<Self> {
        <Self as ValueEnum>::from_str(s, true).map_err(|_| {
            let all: Vec<&str> = Self::value_variants().iter().map(|m| m.as_str()).collect();
            BenchError::input(format!("unknown method `{s}` (known: {})", all.join(", ")))
        })
    }

    pub fn parse_list(flag: &str, s: &str) -> BResult<Vec<Self>> {
        let mut out = Vec::new();
        for name in parse_list::<String>(flag, s)? {
            let m = Self::parse(&name).map_err(|e| e.context(flag))?;
            if !out.contains(&m) {
                out.push(m);
            }
        }
        Ok(out)
    }
}

/// What a method accepts: its `quality` flags and its `pareto` sweep flags.
pub struct MethodSpec {
    pub quality_flags: &'static [&'static str],
    pub sweep_flags: &'static [&'static str],
}

pub fn spec(name: MethodName) -> MethodSpec {
    match name {
        MethodName::Dense => MethodSpec { quality_flags: &[], sweep_flags: &[] },
        MethodName::Window => MethodSpec { quality_flags: &["--width"], sweep_flags: &["--widths"] },
        MethodName::Global => MethodSpec { quality_flags: &["--first", "--last"], sweep_flags: &["--globals"] },
        MethodName::Random => MethodSpec { quality_flags: &["--density"], sweep_flags: &["--densities"] },
        MethodName::Sparsefinder => MethodSpec {
            quality_flags: &["--variant", "--model", "--recall", "--threshold", "--bucket-size", "--clusters", "--query-top"],
            sweep_flags: &["--variants", "--sparsefinder-model", "--recalls", "--bucket-sizes", "--cluster-counts", "--query-top"],
        },
        MethodName::Sbm => MethodSpec {
            quality_flags: &["--edges-per-query", "--density-scale", "--clusters", "--sbm-model"],
            sweep_flags: &["--sbm-edges", "--sbm-clusters", "--sbm-model"],
        },
        MethodName::Topk => MethodSpec {
            quality_flags: &["--k", "--window", "--first", "--last", "--scorer"],
            sweep_flags: &["--topk-ks", "--topk-window", "--topk-scorer"],
        },
        MethodName::Lowrank => MethodSpec {
            quality_flags: &["--rank", "--subset", "--lowrank-model"],
            sweep_flags: &["--lowrank-ranks", "--lowrank-subsets", "--lowrank-model"],
        },
        MethodName::LowrankPattern => MethodSpec {
            quality_flags: &["--rank", "--subset", "--density", "--lowrank-model"],
            sweep_flags: &["--lowrank-ranks", "--lowrank-subsets", "--lowrank-densities", "--lowrank-model"],
        },
        MethodName::Mra => MethodSpec { quality_flags: &["--mode", "--blocks-per-row"], sweep_flags: &["--mra-blocks-per-row", "--mra-modes"] },
    }
}

/// Sparsefinder's three ways of predicting the graph.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum SfVariant {
    Distance,
    Quantization,
    Clustering,
}

/// MRA's two modes as the CLI spells them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
pub enum MraModeArg {
    /// MRA-2: the coarse remainder is merged into the softmax (softmax normaliser only).
    Full,
    /// MRA-2-s: only the selected blocks count (any normaliser).
    Sparse,
}

impl MraModeArg {
    pub fn mode(self) -> MraMode {
        match self {
            MraModeArg::Full => MraMode::Full,
            MraModeArg::Sparse => MraMode::SparseOnly,
        }
    }
}

fn mra_mode_name(mode: MraMode) -> &'static str {
    match mode {
        MraMode::Full => "full",
        MraMode::SparseOnly => "sparse",
    }
}

/// MRA block size used by the bench is the run's `--block`; paper default budget.
const DEFAULT_MRA_BLOCKS_PER_ROW: u32 = 8;

/// The one-line error for MRA-2 with a normaliser other than softmax.
pub fn mra_full_unsupported(normalizer: Normalizer, flag: &str) -> BenchError {
    BenchError::input(format!(
        "{flag} full (MRA-2) merges the coarse remainder into a softmax and has no {} form; use --mode sparse (MRA-2-s) or --normalizer softmax",
        normalizer.label()
    ))
}

/// Resolves MRA's mode against the run's normaliser: without an explicit `--mode`, full under
/// softmax and sparse otherwise; an explicit full mode with another normaliser is an error.
pub fn resolve_mra(method: &mut Method, explicit_mode: Option<MraModeArg>, normalizer: Normalizer) -> BResult<()> {
    if let Method::Mra { mode, .. } = method {
        *mode = match explicit_mode {
            Some(m) => m.mode(),
            None if normalizer == Normalizer::Softmax => MraMode::Full,
            None => MraMode::SparseOnly,
        };
        if *mode == MraMode::Full && normalizer != Normalizer::Softmax {
            return Err(mra_full_unsupported(normalizer, "--mode"));
        }
    }
    Ok(())
}

/// Method flags of `quality` (and the demo). Each applies to one method; giving a flag that does
/// not apply to `--method` is an error.
#[derive(Args, Clone, Debug, Default)]
pub struct MethodFlags {
    /// window: width in tokens [default: 64]
    #[arg(long, value_name = "TOKENS", help_heading = "Method flags")]
    pub width: Option<u32>,
    /// global, topk: leading tokens every query sees (and, for global, that see every key) [default: 1]
    #[arg(long, value_name = "N", help_heading = "Method flags")]
    pub first: Option<u32>,
    /// global, topk: trailing tokens every query sees (and, for global, that see every key) [default: 1]
    #[arg(long, value_name = "N", help_heading = "Method flags")]
    pub last: Option<u32>,
    /// random: block density in [0, 1]; lowrank-pattern: share of key blocks kept per query-block
    /// row, in (0, 1] [default: 0.25]
    #[arg(long, value_name = "D", help_heading = "Method flags")]
    pub density: Option<f64>,
    /// sparsefinder: how pairs are predicted [default: distance]
    #[arg(long, value_enum, help_heading = "Method flags")]
    pub variant: Option<SfVariant>,
    /// sparsefinder: fitted model (JSON from `fit-sparsefinder`) [default: the shipped model,
    /// models/sparsefinder_minilm.json]
    #[arg(long, value_name = "FILE", help_heading = "Method flags")]
    pub model: Option<PathBuf>,
    /// sparsefinder distance: per-head threshold calibrated to this recall [default: 0.95]
    #[arg(long, value_name = "R", help_heading = "Method flags")]
    pub recall: Option<f64>,
    /// sparsefinder distance: absolute squared-distance threshold (instead of --recall)
    #[arg(long, value_name = "T", help_heading = "Method flags")]
    pub threshold: Option<f64>,
    /// sparsefinder quantization: bucket size in tokens [default: 16]
    #[arg(long, value_name = "TOKENS", help_heading = "Method flags")]
    pub bucket_size: Option<usize>,
    /// sparsefinder clustering: number of k-means clusters (one the model fitted) [default: 16];
    /// sbm: clusters k of the training-free init (k-means of the keys) [default: 128]
    #[arg(long, value_name = "K", help_heading = "Method flags")]
    pub clusters: Option<usize>,
    /// sparsefinder clustering: clusters each query joins [default: 2]
    #[arg(long, value_name = "N", help_heading = "Method flags")]
    pub query_top: Option<usize>,
    /// sbm: expected sampled edges per query (before duplicates are dropped) [default: 32]
    #[arg(long, value_name = "E", help_heading = "Method flags")]
    pub edges_per_query: Option<f64>,
    /// sbm: scale of the model's expected edge mass (1 = the model as is; instead of --edges-per-query)
    #[arg(long, value_name = "S", help_heading = "Method flags")]
    pub density_scale: Option<f64>,
    /// sbm: SBM parameters (safetensors, layout in sparse_attn::patterns::sbm) [default: the
    /// training-free init: clusters = k-means of each head's keys, phi = identity; seeded by --seed]
    #[arg(long, value_name = "FILE", help_heading = "Method flags")]
    pub sbm_model: Option<PathBuf>,
    /// topk: best-scored keys every query sees [default: 64]
    #[arg(long, value_name = "K", help_heading = "Method flags")]
    pub k: Option<usize>,
    /// topk: local window width in tokens, 0 = none [default: 11]
    #[arg(long, value_name = "TOKENS", help_heading = "Method flags")]
    pub window: Option<u32>,
    /// topk: linear scorer sigmoid(w.k + b) per layer and head (JSON, format
    /// sparse-attn-topk-linear) [default: the training-free mean-query scorer]
    #[arg(long, value_name = "FILE", help_heading = "Method flags")]
    pub scorer: Option<PathBuf>,
    /// lowrank, lowrank-pattern: principal directions used (at most the model's rank) [default: 32]
    #[arg(long, value_name = "R", help_heading = "Method flags")]
    pub rank: Option<usize>,
    /// lowrank, lowrank-pattern: exact scores per query row, m >= rank (the first 2 tokens plus
    /// evenly spaced positions) [default: 64]
    #[arg(long, value_name = "M", help_heading = "Method flags")]
    pub subset: Option<usize>,
    /// lowrank, lowrank-pattern: fitted model (safetensors from sparse_attn::lowrank) [default: fit
    /// one on every layer and head of the data file's other texts than the evaluated one, cached
    /// under --out]
    #[arg(long, value_name = "FILE", help_heading = "Method flags")]
    pub lowrank_model: Option<PathBuf>,
    /// mra: full (MRA-2: coarse remainder merged into the softmax; softmax only) or sparse
    /// (MRA-2-s: selected blocks only; any normaliser) [default: full with --normalizer softmax,
    /// else sparse]
    #[arg(long, value_enum, help_heading = "Method flags")]
    pub mode: Option<MraModeArg>,
    /// mra: block budget per query-block row (blocks_per_row × q_blocks blocks per slice, chosen
    /// globally, priors included) [default: 8]
    #[arg(long, value_name = "N", help_heading = "Method flags")]
    pub blocks_per_row: Option<u32>,
}

impl MethodFlags {
    fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        let mut add = |set: bool, name: &'static str| {
            if set {
                v.push(name)
            }
        };
        add(self.width.is_some(), "--width");
        add(self.first.is_some(), "--first");
        add(self.last.is_some(), "--last");
        add(self.density.is_some(), "--density");
        add(self.variant.is_some(), "--variant");
        add(self.model.is_some(), "--model");
        add(self.recall.is_some(), "--recall");
        add(self.threshold.is_some(), "--threshold");
        add(self.bucket_size.is_some(), "--bucket-size");
        add(self.clusters.is_some(), "--clusters");
        add(self.query_top.is_some(), "--query-top");
        add(self.edges_per_query.is_some(), "--edges-per-query");
        add(self.density_scale.is_some(), "--density-scale");
        add(self.sbm_model.is_some(), "--sbm-model");
        add(self.k.is_some(), "--k");
        add(self.window.is_some(), "--window");
        add(self.scorer.is_some(), "--scorer");
        add(self.rank.is_some(), "--rank");
        add(self.subset.is_some(), "--subset");
        add(self.lowrank_model.is_some(), "--lowrank-model");
        add(self.mode.is_some(), "--mode");
        add(self.blocks_per_row.is_some(), "--blocks-per-row");
        v
    }
}

/// Rejects flags given for a method that does not take them.
fn check_applicable(name: MethodName, given: &[&'static str], accepted: &[&'static str], which: &str) -> BResult<()> {
    if let Some(flag) = given.iter().find(|f| !accepted.contains(f)) {
        let takes = if accepted.is_empty() { "no method flags".to_string() } else { accepted.join(", ") };
        return Err(BenchError::input(format!("{flag} does not apply to {which} {} (it takes {takes})", name.as_str())));
    }
    Ok(())
}

/// A concrete, buildable pattern method with its parameters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Method {
    Dense,
    Window { width: u32 },
    Global { first: u32, last: u32 },
    Random { density: f64, seed: u64 },
    Sparsefinder { variant: Variant },
    /// `clusters` applies to [`SbmInit::Keys`] only; `seed` seeds k-means and the sampler.
    Sbm { density: Density, clusters: usize, seed: u64, init: SbmInit },
    TopK { k: usize, window: u32, first: u32, last: u32, scorer: TopkScorer },
    /// Full-row low-rank reconstruction (evaluated by `eval::evaluate_lowrank`, not a pattern).
    LowRank { rank: usize, subset: usize },
    /// Block pattern predicted from the reconstructed rows.
    LowRankPattern { rank: usize, subset: usize, density: f64 },
    /// MRA at the run's block size: budget `blocks_per_row × q_blocks` per slice.
    Mra { blocks_per_row: u32, mode: MraMode },
}

/// Where the SBM parameters come from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SbmInit {
    /// Training-free: clusters = k-means of the keys, phi = identity (built with the pattern, so
    /// its cost is part of the build time).
    Keys,
    /// A loaded [`SbmModel`] (`Models::sbm`).
    Model,
}

/// How top-k scores the keys.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum TopkScorer {
    /// Training-free: the score the mean query gives each key.
    MeanQuery,
    /// A loaded [`LinearScorerModel`] (`Models::topk`).
    Linear,
}

/// Fitted models a run loaded (only those its methods need).
#[derive(Default)]
pub struct Models {
    pub sparsefinder: Option<SparsefinderModel>,
    pub sbm: Option<SbmModel>,
    pub topk: Option<LinearScorerModel>,
    pub lowrank: Option<LowRankModels>,
}

/// Model files given on the command line (`None` = the default, where there is one), plus what
/// a default low-rank fit needs: the texts the run evaluates and where to cache fits.
#[derive(Clone, Copy, Default)]
pub struct ModelFiles<'a> {
    pub sparsefinder: Option<&'a Path>,
    pub sbm: Option<&'a Path>,
    pub topk: Option<&'a Path>,
    pub lowrank: Option<&'a Path>,
    pub texts: &'a [String],
    pub cache_dir: Option<&'a Path>,
}

/// The low-rank model used for each evaluated text: a given file (same model for every text), or
/// one fitted per evaluated text on the data file's other texts (leave-one-text-out).
pub struct LowRankModels {
    by_text: BTreeMap<String, LowRankModel>,
    /// What each model was fitted on (metrics.json / pareto.json `lowrank_model`).
    pub info: serde_json::Value,
}

impl LowRankModels {
    pub fn for_text(&self, text: &str) -> sparse_attn::Result<&LowRankModel> {
        self.by_text.get(text).ok_or_else(|| sparse_attn::Error::Unsupported(format!("lowrank: no model for text `{text}` (none was loaded or fitted)")))
    }
}

/// Calibration rows at most fitted per model (every `row_stride`-th query keeps it near this).
const LOWRANK_FIT_ROWS: usize = 32768;

fn sanitize(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '-' || c == '_' { c } else { '_' }).collect()
}

fn load_lowrank(methods: &[Method], files: ModelFiles<'_>, data: &sparse_attn::data::AttentionData) -> BResult<Option<LowRankModels>> {
    let ranks: Vec<usize> = methods
        .iter()
        .filter_map(|m| match *m {
            Method::LowRank { rank, .. } | Method::LowRankPattern { rank, .. } => Some(rank),
            _ => None,
        })
        .collect();
    let Some(&max_rank) = ranks.iter().max() else { return Ok(None) };
    let seq = data.seq();
    if let Some(path) = files.lowrank {
        let model = LowRankModel::load(path).map_err(|e| BenchError::from(e).context(format!("lowrank model `{}`", path.display())))?;
        let basis = model.basis(seq).map_err(|e| BenchError::input(format!("lowrank model `{}` does not fit data `{}`: {e}", path.display(), data.path().display())))?;
        if basis.rank < max_rank {
            return Err(BenchError::input(format!("lowrank model `{}` has rank {}, but rank {max_rank} was asked for", path.display(), basis.rank)));
        }
        let info = serde_json::json!({
            "source": "file", "file": path.display().to_string(), "rank": basis.rank, "rows": basis.rows, "lengths": model.lengths(),
            "fitted_on": "unknown (a given model file; its fit data is not recorded by this run)",
        });
        let by_text = files.texts.iter().map(|t| (t.clone(), model.clone())).collect();
        return Ok(Some(LowRankModels { by_text, info }));
    }
    let all = data.texts();
    let layers = data.layers();
    let mut by_text = BTreeMap::new();
    let mut fits = Vec::new();
    for text in files.texts {
        let train: Vec<&String> = all.iter().filter(|t| *t != text).collect();
        if train.is_empty() {
            return Err(BenchError::input(format!(
                "lowrank: data `{}` has only the evaluated text `{text}`, nothing to fit on without it (pass --lowrank-model FILE)",
                data.path().display()
            )));
        }
        let total_rows = train.len() * layers * data.heads() * seq;
        let row_stride = total_rows.div_ceil(LOWRANK_FIT_ROWS).max(1);
        let stem = data.path().file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
        let name = format!("lowrank_{}_without-{}_r{max_rank}_stride{row_stride}.safetensors", sanitize(&stem), sanitize(text));
        let cache = files.cache_dir.map(|d| d.join(&name));
        let cached = cache.as_ref().filter(|p| p.exists()).and_then(|p| LowRankModel::load(p).ok()).filter(|m| m.basis(seq).is_ok_and(|b| b.rank >= max_rank));
        let t = std::time::Instant::now();
        let from_cache = cached.is_some();
        let model = match cached {
            Some(m) => m,
            None => {
                let mut fitter = LowRankFitter::new(max_rank)?;
                for tr in &train {
                    for l in 0..layers {
                        let (q, k, _) = data.layer(tr, l)?;
                        fitter.add_scores(&q.view(), &k.view(), row_stride)?;
                    }
                }
                let m = fitter.finish().map_err(|e| BenchError::from(e).context(format!("fitting the lowrank model without text {text}")))?;
                if let Some(p) = &cache {
                    m.save(p).map_err(|e| BenchError::from(e).context(format!("caching the lowrank model to `{}`", p.display())))?;
                }
                m
            }
        };
        let basis = model.basis(seq)?;
        fits.push(serde_json::json!({
            "evaluated_text": text,
            "fitted_on_texts": train,
            "fitted_on_layers": data.layer_ids(),
            "heads": "all",
            "row_stride": row_stride,
            "rows": basis.rows,
            "rank": basis.rank,
            "explained_variance_at_rank": basis.explained_variance(max_rank),
            "cache_file": cache.as_ref().map(|p| p.display().to_string()),
            "loaded_from_cache": from_cache,
            "ms": crate::common::ms_since(t),
        }));
        by_text.insert(text.clone(), model);
    }
    let info = serde_json::json!({
        "source": "fitted",
        "data": data.path().display().to_string(),
        "how": "leave-one-text-out: for each evaluated text, a model fitted on the score rows (scale/sqrt(d) q.k) of every layer and head of the data file's other texts, every row_stride-th query",
        "fits": fits,
    });
    Ok(Some(LowRankModels { by_text, info }))
}

impl Models {
    /// Loads the models `methods` need from `files` and checks each fits `data`.
    pub fn load(methods: &[Method], files: ModelFiles<'_>, data: &sparse_attn::data::AttentionData) -> BResult<Self> {
        let mut m = Models::default();
        if methods.iter().any(|x| matches!(x, Method::Sparsefinder { .. })) {
            m.sparsefinder = Some(load_sparsefinder(files.sparsefinder, Some(data))?);
        }
        if methods.iter().any(|x| matches!(x, Method::Sbm { init: SbmInit::Model, .. })) {
            let path = files.sbm.ok_or_else(|| BenchError::input("sbm: no model file given"))?;
            let what = |e: sparse_attn::Error| BenchError::from(e).context(format!("sbm model `{}`", path.display()));
            let model = SbmModel::load(path).map_err(what)?;
            let d = model.layers[0].heads[0].clusters.ncols();
            if model.layers.len() < data.layers() || d != data.head_dim() {
                return Err(BenchError::input(format!(
                    "sbm model `{}` does not fit data `{}`: it has {} layers of head_dim {d}, the data {} layers of head_dim {}",
                    path.display(),
                    data.path().display(),
                    model.layers.len(),
                    data.layers(),
                    data.head_dim()
                )));
            }
            m.sbm = Some(model);
        }
        if methods.iter().any(|x| matches!(x, Method::TopK { scorer: TopkScorer::Linear, .. })) {
            let path = files.topk.ok_or_else(|| BenchError::input("topk: no scorer file given"))?;
            let model = LinearScorerModel::load(path).map_err(|e| BenchError::from(e).context(format!("topk scorer `{}`", path.display())))?;
            if model.layers.len() < data.layers() || model.head_dim != data.head_dim() {
                return Err(BenchError::input(format!(
                    "topk scorer `{}` does not fit data `{}`: it has {} layers of head_dim {}, the data {} layers of head_dim {}",
                    path.display(),
                    data.path().display(),
                    model.layers.len(),
                    model.head_dim,
                    data.layers(),
                    data.head_dim()
                )));
            }
            m.topk = Some(model);
        }
        m.lowrank = load_lowrank(methods, files, data)?;
        Ok(m)
    }
}

/// What a method's build may use besides the problem shape.
pub struct BuildInput<'a> {
    pub q: &'a Array4<f32>,
    pub k: &'a Array4<f32>,
    /// V, for methods whose build summarises it (MRA-2's block means V̂).
    pub v: Option<&'a Array4<f32>>,
    pub shape: AttentionShape,
    pub block: u32,
    /// Stored layer index in the data file (learned methods pick their per-layer model by it).
    pub layer_index: usize,
    /// Text of the data file (low-rank picks its leave-one-out model by it).
    pub text: &'a str,
    pub models: &'a Models,
}

impl Method {
    pub fn name(&self) -> MethodName {
        match self {
            Method::Dense => MethodName::Dense,
            Method::Window { .. } => MethodName::Window,
            Method::Global { .. } => MethodName::Global,
            Method::Random { .. } => MethodName::Random,
            Method::Sparsefinder { .. } => MethodName::Sparsefinder,
            Method::Sbm { .. } => MethodName::Sbm,
            Method::TopK { .. } => MethodName::Topk,
            Method::LowRank { .. } => MethodName::Lowrank,
            Method::LowRankPattern { .. } => MethodName::LowrankPattern,
            Method::Mra { .. } => MethodName::Mra,
        }
    }

    /// (variant, knob, value) as reported in pareto.csv.
    pub fn describe(&self) -> (String, String, String) {
        match *self {
            Method::Dense => ("-".into(), "none".into(), "-".into()),
            Method::Window { width } => ("symmetric".into(), "width".into(), width.to_string()),
            Method::Global { first, last } => ("first+last".into(), "global_tokens".into(), format!("{first}+{last}")),
            Method::Random { density, .. } => ("blocks".into(), "density".into(), format!("{density}")),
            Method::Sparsefinder { variant } => {
                let (knob, value) = variant.knob();
                (variant.name().into(), knob.into(), value)
            }
            Method::Sbm { density, init, .. } => {
                let variant = match init {
                    SbmInit::Keys => "kmeans-init",
                    SbmInit::Model => "model",
                };
                let (knob, value) = match density {
                    Density::EdgesPerQuery(e) => ("edges_per_query", e),
                    Density::Scale(s) => ("density_scale", s),
                };
                (variant.into(), knob.into(), format!("{value}"))
            }
            Method::TopK { k, scorer, .. } => {
                let variant = match scorer {
                    TopkScorer::MeanQuery => "mean-query",
                    TopkScorer::Linear => "linear",
                };
                (variant.into(), "k".into(), k.to_string())
            }
            Method::LowRank { rank, subset } => ("full-row".into(), "rank/subset".into(), format!("{rank}/{subset}")),
            Method::LowRankPattern { rank, subset, density } => (format!("r{rank}-m{subset}"), "density".into(), format!("{density}")),
            Method::Mra { blocks_per_row, mode } => (mra_mode_name(mode).into(), "blocks_per_row".into(), blocks_per_row.to_string()),
        }
    }

    /// Short label, e.g. `window(width=64)`.
    pub fn label(&self) -> String {
        let (variant, knob, value) = self.describe();
        match self {
            Method::Dense => "dense".into(),
            Method::Sparsefinder { .. } | Method::LowRankPattern { .. } | Method::Mra { .. } => format!("{}-{variant}({knob}={value})", self.name().as_str()),
            _ => format!("{}({knob}={value})", self.name().as_str()),
        }
    }

    /// Curve name in plots: one curve per method (and variant).
    pub fn curve(&self) -> String {
        match self {
            Method::Sparsefinder { variant } => format!("sparsefinder-{}", variant.name()),
            Method::Sbm { init: SbmInit::Model, .. } => "sbm-model".into(),
            Method::TopK { scorer: TopkScorer::Linear, .. } => "topk-linear".into(),
            Method::LowRankPattern { rank, subset, .. } => format!("lowrank-pattern-r{rank}-m{subset}"),
            Method::Mra { mode, .. } => format!("mra-{}", mra_mode_name(*mode)),
            _ => self.name().as_str().into(),
        }
    }

    /// Point label in plots (the knob value).
    pub fn point_label(&self) -> String {
        match *self {
            Method::Dense => "dense".into(),
            Method::Window { width } => format!("w={width}"),
            Method::Sbm { density: Density::EdgesPerQuery(e), .. } => format!("e={e}"),
            Method::TopK { k, .. } => format!("k={k}"),
            Method::LowRank { rank, subset } => format!("r={rank},m={subset}"),
            Method::LowRankPattern { density, .. } => format!("d={density}"),
            Method::Mra { blocks_per_row, .. } => format!("b/r={blocks_per_row}"),
            _ => self.describe().2,
        }
    }

    /// The MRA pattern and its coarse remainder (`None` for other methods). The low-resolution
    /// stage (block means, scores, selection, row terms) runs on `engine`'s GPU when one is
    /// given, else on the CPU; V̂ is computed when `input.v` is given (MRA-2 needs it).
    pub fn build_mra(&self, input: &BuildInput<'_>, engine: Option<&sparse_attn::Engine>) -> Option<sparse_attn::Result<Mra>> {
        let Method::Mra { blocks_per_row, mode } = *self else { return None };
        let config = MraConfig::new(input.block, blocks_per_row).with_mode(mode);
        let v = input.v.map(|v| v.view());
        Some(match engine {
            Some(engine) => config.build_with_engine(engine, &input.q.view(), &input.k.view(), v.as_ref(), &input.shape),
            None => config.build(&input.q.view(), &input.k.view(), v.as_ref(), &input.shape),
        })
    }

    pub fn build(&self, input: &BuildInput<'_>) -> sparse_attn::Result<BlockPattern> {
        let (b, shape) = (input.block, &input.shape);
        match *self {
            Method::Mra { .. } => self.build_mra(input, None).expect("mra").map(|m| m.pattern),
            Method::Dense => Dense::new().with_blocks(b, b).build(shape),
            Method::Window { width } => Window::new(width).with_blocks(b, b).build(shape),
            Method::Global { first, last } => GlobalTokens::new(first, last).with_blocks(b, b).build(shape),
            Method::Random { density, seed } => RandomBlocks::new(density, seed).with_blocks(b, b).build(shape),
            Method::Sparsefinder { variant } => {
                let model = input
                    .models
                    .sparsefinder
                    .as_ref()
                    .ok_or_else(|| sparse_attn::Error::Unsupported("sparsefinder needs a model (none was loaded)".into()))?;
                model.build(input.layer_index, input.q, input.k, &Sparsefinder::new(variant).with_blocks(b, b))
            }
            Method::Sbm { density, clusters, seed, init } => {
                let config = SbmConfig::default().with_density(density).with_clusters(clusters).with_seed(seed).with_blocks(b, b);
                let (q, k) = (input.q.view(), input.k.view());
                match init {
                    SbmInit::Keys => Sbm::new(config.clone()).build(&SbmLayer::from_keys(&k, &config)?, &q, &k),
                    SbmInit::Model => {
                        let model = input.models.sbm.as_ref().ok_or_else(|| sparse_attn::Error::Unsupported("sbm needs a model (none was loaded)".into()))?;
                        let layer = model.layers.get(input.layer_index).ok_or_else(|| {
                            sparse_attn::Error::Data(format!("sbm model has {} layers, asked for layer index {}", model.layers.len(), input.layer_index))
                        })?;
                        Sbm::new(config).build(layer, &q, &k)
                    }
                }
            }
            Method::TopK { k, window, first, last, scorer } => {
                let scorer = match scorer {
                    TopkScorer::MeanQuery => Scorer::MeanQuery,
                    TopkScorer::Linear => input
                        .models
                        .topk
                        .as_ref()
                        .ok_or_else(|| sparse_attn::Error::Unsupported("topk needs a scorer (none was loaded)".into()))?
                        .scorer(input.layer_index)?,
                };
                TopK { k, window, first, last, block_q: b, block_k: b }.build(&input.q.view(), &input.k.view(), &scorer)
            }
            Method::LowRank { .. } => Err(sparse_attn::Error::Unsupported("lowrank (full-row reconstruction) builds no block pattern; use lowrank-pattern".into())),
            Method::LowRankPattern { rank, subset, density } => {
                let models = input.models.lowrank.as_ref().ok_or_else(|| sparse_attn::Error::Unsupported("lowrank-pattern needs a model (none was loaded)".into()))?;
                let plan = models.for_text(input.text)?.plan(&LowRankConfig::new(rank, subset), input.shape.seq_kv)?;
                LowRankPattern::new(density).with_blocks(b, b).build(&plan, &input.q.view(), &input.k.view())
            }
        }
    }
}

fn check_unit(flag: &str, x: f64) -> BResult<f64> {
    if (0.0..=1.0).contains(&x) {
        Ok(x)
    } else {
        Err(BenchError::input(format!("{flag} {x}: must lie in [0, 1]")))
    }
}

fn sf_variant(v: SfVariant, f: &MethodFlags) -> BResult<Variant> {
    let given = f.given();
    let allowed: &[&str] = match v {
        SfVariant::Distance => &["--recall", "--threshold"],
        SfVariant::Quantization => &["--bucket-size"],
        SfVariant::Clustering => &["--clusters", "--query-top"],
    };
    let variant_flags = ["--recall", "--threshold", "--bucket-size", "--clusters", "--query-top"];
    if let Some(flag) = given.iter().find(|g| variant_flags.contains(g) && !allowed.contains(g)) {
        return Err(BenchError::input(format!(
            "{flag} does not apply to --variant {} (it takes {})",
            v.to_possible_value().map(|p| p.get_name().to_string()).unwrap_or_default(),
            allowed.join(", ")
        )));
    }
    Ok(match v {
        SfVariant::Distance => match (f.recall, f.threshold) {
            (Some(_), Some(_)) => return Err(BenchError::input("--recall and --threshold are alternatives; give one")),
            (_, Some(t)) => Variant::Distance { threshold: Threshold::Distance(t) },
            (r, None) => {
                let r = r.unwrap_or(0.95);
                if !(r > 0.0 && r <= 1.0) {
                    return Err(BenchError::input(format!("--recall {r}: must lie in (0, 1]")));
                }
                Variant::Distance { threshold: Threshold::Recall(r) }
            }
        },
        SfVariant::Quantization => {
            let bucket_size = f.bucket_size.unwrap_or(16);
            if bucket_size == 0 {
                return Err(BenchError::input("--bucket-size must be at least 1"));
            }
            Variant::Quantization { bucket_size }
        }
        SfVariant::Clustering => {
            let (clusters, query_top) = (f.clusters.unwrap_or(16), f.query_top.unwrap_or(2));
            if query_top == 0 || query_top > clusters {
                return Err(BenchError::input(format!("--query-top {query_top} must lie in 1..={clusters} (--clusters)")));
            }
            Variant::Clustering { clusters, query_top }
        }
    })
}

/// The method of `quality --method NAME [method flags]`.
pub fn from_flags(name: MethodName, f: &MethodFlags, seed: u64) -> BResult<Method> {
    check_applicable(name, &f.given(), spec(name).quality_flags, "--method")?;
    Ok(match name {
        MethodName::Dense => Method::Dense,
        MethodName::Window => {
            let width = f.width.unwrap_or(64);
            if width == 0 {
                return Err(BenchError::input("--width must be at least 1"));
            }
            Method::Window { width }
        }
        MethodName::Global => Method::Global { first: f.first.unwrap_or(1), last: f.last.unwrap_or(1) },
        MethodName::Random => Method::Random { density: check_unit("--density", f.density.unwrap_or(0.25))?, seed },
        MethodName::Sparsefinder => Method::Sparsefinder { variant: sf_variant(f.variant.unwrap_or(SfVariant::Distance), f)? },
        MethodName::Sbm => {
            let density = match (f.edges_per_query, f.density_scale) {
                (Some(_), Some(_)) => return Err(BenchError::input("--edges-per-query and --density-scale are alternatives; give one")),
                (_, Some(s)) => Density::Scale(check_nonneg("--density-scale", s)?),
                (e, None) => Density::EdgesPerQuery(check_nonneg("--edges-per-query", e.unwrap_or(DEFAULT_SBM_EDGES))?),
            };
            let init = if f.sbm_model.is_some() { SbmInit::Model } else { SbmInit::Keys };
            if init == SbmInit::Model && f.clusters.is_some() {
                return Err(BenchError::input("--clusters does not apply with --sbm-model (the model fixes its clusters)"));
            }
            Method::Sbm { density, clusters: check_clusters("--clusters", f.clusters.unwrap_or(DEFAULT_SBM_CLUSTERS))?, seed, init }
        }
        MethodName::Topk => Method::TopK {
            k: f.k.unwrap_or(DEFAULT_TOPK_K),
            window: f.window.unwrap_or(DEFAULT_TOPK_WINDOW),
            first: f.first.unwrap_or(1),
            last: f.last.unwrap_or(1),
            scorer: if f.scorer.is_some() { TopkScorer::Linear } else { TopkScorer::MeanQuery },
        },
        MethodName::Lowrank => {
            let (rank, subset) = check_rank_subset("--rank", "--subset", f.rank.unwrap_or(DEFAULT_LOWRANK_RANK), f.subset.unwrap_or(DEFAULT_LOWRANK_SUBSET))?;
            Method::LowRank { rank, subset }
        }
        MethodName::LowrankPattern => {
            let (rank, subset) = check_rank_subset("--rank", "--subset", f.rank.unwrap_or(DEFAULT_LOWRANK_RANK), f.subset.unwrap_or(DEFAULT_LOWRANK_SUBSET))?;
            Method::LowRankPattern { rank, subset, density: check_density("--density", f.density.unwrap_or(0.25))? }
        }
        MethodName::Mra => {
            let blocks_per_row = f.blocks_per_row.unwrap_or(DEFAULT_MRA_BLOCKS_PER_ROW);
            if blocks_per_row == 0 {
                return Err(BenchError::input("--blocks-per-row must be at least 1"));
            }
            // The mode is settled against the normaliser by `resolve_mra`.
            Method::Mra { blocks_per_row, mode: f.mode.map(MraModeArg::mode).unwrap_or(MraMode::Full) }
        }
    })
}

const DEFAULT_SBM_EDGES: f64 = 32.0;
const DEFAULT_SBM_CLUSTERS: usize = 128;
const DEFAULT_TOPK_K: usize = 64;
const DEFAULT_TOPK_WINDOW: u32 = 11;
const DEFAULT_LOWRANK_RANK: usize = 32;
const DEFAULT_LOWRANK_SUBSET: usize = 64;

fn check_rank_subset(rank_flag: &str, subset_flag: &str, rank: usize, subset: usize) -> BResult<(usize, usize)> {
    if rank == 0 {
        return Err(BenchError::input(format!("{rank_flag} must be at least 1")));
    }
    if subset < rank {
        return Err(BenchError::input(format!("{subset_flag} {subset} must be at least {rank_flag} {rank}")));
    }
    Ok((rank, subset))
}

fn check_density(flag: &str, d: f64) -> BResult<f64> {
    if d > 0.0 && d <= 1.0 {
        Ok(d)
    } else {
        Err(BenchError::input(format!("{flag} {d}: must lie in (0, 1]")))
    }
}

fn check_nonneg(flag: &str, x: f64) -> BResult<f64> {
    if x.is_finite() && x >= 0.0 {
        Ok(x)
    } else {
        Err(BenchError::input(format!("{flag} {x}: must be finite and non-negative")))
    }
}

fn check_clusters(flag: &str, k: usize) -> BResult<usize> {
    if k == 0 {
        return Err(BenchError::input(format!("{flag} must be at least 1")));
    }
    Ok(k)
}

/// Knob sweeps of `pareto`.
#[derive(Args, Clone, Debug, Default)]
pub struct SweepFlags {
    /// window: widths swept, in tokens [default: 8,16,32,64,128,256]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub widths: Option<String>,
    /// global: numbers of first (= last) global tokens swept [default: 1,4,16,64]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub globals: Option<String>,
    /// random: block densities swept [default: 0.05,0.1,0.25,0.5]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub densities: Option<String>,
    /// sparsefinder: variants swept [default: distance,quantization,clustering]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub variants: Option<String>,
    /// sparsefinder: fitted model [default: the shipped model, models/sparsefinder_minilm.json]
    #[arg(long, value_name = "FILE", help_heading = "Sweeps")]
    pub sparsefinder_model: Option<PathBuf>,
    /// sparsefinder distance: target recalls swept [default: 0.8,0.9,0.95,0.98,0.99]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub recalls: Option<String>,
    /// sparsefinder quantization: bucket sizes swept [default: 4,8,16,32,64]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub bucket_sizes: Option<String>,
    /// sparsefinder clustering: cluster counts swept (ones the model fitted) [default: 4,8,16,32]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub cluster_counts: Option<String>,
    /// sparsefinder clustering: clusters each query joins [default: 2]
    #[arg(long, value_name = "N", help_heading = "Sweeps")]
    pub query_top: Option<usize>,
    /// sbm: expected sampled edges per query swept [default: 8,16,32,64,128]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub sbm_edges: Option<String>,
    /// sbm: clusters k of the training-free init (k-means of the keys) [default: 128]
    #[arg(long, value_name = "K", help_heading = "Sweeps")]
    pub sbm_clusters: Option<usize>,
    /// sbm: SBM parameters (safetensors) instead of the training-free init
    #[arg(long, value_name = "FILE", help_heading = "Sweeps")]
    pub sbm_model: Option<PathBuf>,
    /// topk: k (best-scored keys per query) swept [default: 8,16,32,64,128]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub topk_ks: Option<String>,
    /// topk: local window width in tokens, 0 = none (first = last = 1 token) [default: 11]
    #[arg(long, value_name = "TOKENS", help_heading = "Sweeps")]
    pub topk_window: Option<u32>,
    /// topk: linear scorer (JSON) instead of the training-free mean-query scorer
    #[arg(long, value_name = "FILE", help_heading = "Sweeps")]
    pub topk_scorer: Option<PathBuf>,
    /// lowrank, lowrank-pattern: ranks swept [default: 8,16,32]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub lowrank_ranks: Option<String>,
    /// lowrank, lowrank-pattern: exact scores per row swept (pairs with subset < rank are skipped)
    /// [default: 32,64,128]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub lowrank_subsets: Option<String>,
    /// lowrank-pattern: block densities swept [default: 0.125,0.25,0.5]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub lowrank_densities: Option<String>,
    /// lowrank, lowrank-pattern: fitted model (safetensors) [default: fit one per evaluated text on
    /// every layer and head of the data file's other texts, cached under --out]
    #[arg(long, value_name = "FILE", help_heading = "Sweeps")]
    pub lowrank_model: Option<PathBuf>,
    /// mra: blocks per query-block row swept [default: 1,2,4,8,16]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub mra_blocks_per_row: Option<String>,
    /// mra: modes swept, full (MRA-2, softmax only) and/or sparse (MRA-2-s) [default: full,sparse
    /// with --normalizer softmax, else sparse]
    #[arg(long, value_name = "LIST", help_heading = "Sweeps")]
    pub mra_modes: Option<String>,
}

impl SweepFlags {
    fn given(&self) -> Vec<&'static str> {
        let mut v = Vec::new();
        for (set, name) in [
            (self.widths.is_some(), "--widths"),
            (self.globals.is_some(), "--globals"),
            (self.densities.is_some(), "--densities"),
            (self.variants.is_some(), "--variants"),
            (self.sparsefinder_model.is_some(), "--sparsefinder-model"),
            (self.recalls.is_some(), "--recalls"),
            (self.bucket_sizes.is_some(), "--bucket-sizes"),
            (self.cluster_counts.is_some(), "--cluster-counts"),
            (self.query_top.is_some(), "--query-top"),
            (self.sbm_edges.is_some(), "--sbm-edges"),
            (self.sbm_clusters.is_some(), "--sbm-clusters"),
            (self.sbm_model.is_some(), "--sbm-model"),
            (self.topk_ks.is_some(), "--topk-ks"),
            (self.topk_window.is_some(), "--topk-window"),
            (self.topk_scorer.is_some(), "--topk-scorer"),
            (self.lowrank_ranks.is_some(), "--lowrank-ranks"),
            (self.lowrank_subsets.is_some(), "--lowrank-subsets"),
            (self.lowrank_densities.is_some(), "--lowrank-densities"),
            (self.lowrank_model.is_some(), "--lowrank-model"),
            (self.mra_blocks_per_row.is_some(), "--mra-blocks-per-row"),
            (self.mra_modes.is_some(), "--mra-modes"),
        ] {
            if set {
                v.push(name);
            }
        }
        v
    }
}

/// Checks that every sweep flag given belongs to one of `methods`.
pub fn check_sweep_flags(methods: &[MethodName], f: &SweepFlags) -> BResult<()> {
    for flag in f.given() {
        if !methods.iter().any(|m| spec(*m).sweep_flags.contains(&flag)) {
            let owner = MethodName::value_variants().iter().find(|m| spec(**m).sweep_flags.contains(&flag)).map(|m| m.as_str()).unwrap_or("?");
            let given: Vec<&str> = methods.iter().map(|m| m.as_str()).collect();
            return Err(BenchError::input(format!(
                "{flag} applies to method {owner}, which is not in --methods ({})",
                given.join(",")
            )));
        }
    }
    Ok(())
}

/// The knob values a method is swept over in `pareto`.
pub fn sweep(name: MethodName, f: &SweepFlags, seed: u64, normalizer: Normalizer) -> BResult<Vec<Method>> {
    let list = |flag: &str, given: &Option<String>, default: &str| -> BResult<Vec<f64>> { parse_list(flag, given.as_deref().unwrap_or(default)) };
    let ints = |flag: &str, given: &Option<String>, default: &str| -> BResult<Vec<usize>> { parse_list(flag, given.as_deref().unwrap_or(default)) };
    Ok(match name {
        MethodName::Dense => vec![Method::Dense],
        MethodName::Window => {
            let w = ints("--widths", &f.widths, "8,16,32,64,128,256")?;
            if w.contains(&0) {
                return Err(BenchError::input("--widths: a width must be at least 1"));
            }
            w.into_iter().map(|width| Method::Window { width: width as u32 }).collect()
        }
        MethodName::Global => {
            ints("--globals", &f.globals, "1,4,16,64")?.into_iter().map(|n| Method::Global { first: n as u32, last: n as u32 }).collect()
        }
        MethodName::Random => list("--densities", &f.densities, "0.05,0.1,0.25,0.5")?
            .into_iter()
            .map(|d| Ok(Method::Random { density: check_unit("--densities", d)?, seed }))
            .collect::<BResult<_>>()?,
        MethodName::Sparsefinder => {
            let variants: Vec<SfVariant> = parse_list::<String>("--variants", f.variants.as_deref().unwrap_or("distance,quantization,clustering"))?
                .iter()
                .map(|s| SfVariant::from_str(s, true).map_err(|_| BenchError::input(format!("--variants: unknown variant `{s}` (distance, quantization, clustering)"))))
                .collect::<BResult<_>>()?;
            let mut out = Vec::new();
            let query_top = f.query_top.unwrap_or(2);
            for v in variants {
                match v {
                    SfVariant::Distance => {
                        for r in list("--recalls", &f.recalls, "0.8,0.9,0.95,0.98,0.99")? {
                            if !(r > 0.0 && r <= 1.0) {
                                return Err(BenchError::input(format!("--recalls: {r} must lie in (0, 1]")));
                            }
                            out.push(Method::Sparsefinder { variant: Variant::Distance { threshold: Threshold::Recall(r) } });
                        }
                    }
                    SfVariant::Quantization => {
                        for bucket_size in ints("--bucket-sizes", &f.bucket_sizes, "4,8,16,32,64")? {
                            if bucket_size == 0 {
                                return Err(BenchError::input("--bucket-sizes: a bucket size must be at least 1"));
                            }
                            out.push(Method::Sparsefinder { variant: Variant::Quantization { bucket_size } });
                        }
                    }
                    SfVariant::Clustering => {
                        for clusters in ints("--cluster-counts", &f.cluster_counts, "4,8,16,32")? {
                            if query_top == 0 || query_top > clusters {
                                return Err(BenchError::input(format!("--query-top {query_top} must lie in 1..={clusters} (a swept cluster count)")));
                            }
                            out.push(Method::Sparsefinder { variant: Variant::Clustering { clusters, query_top } });
                        }
                    }
                }
            }
            out
        }
        MethodName::Sbm => {
            let init = if f.sbm_model.is_some() { SbmInit::Model } else { SbmInit::Keys };
            if init == SbmInit::Model && f.sbm_clusters.is_some() {
                return Err(BenchError::input("--sbm-clusters does not apply with --sbm-model (the model fixes its clusters)"));
            }
            let clusters = check_clusters("--sbm-clusters", f.sbm_clusters.unwrap_or(DEFAULT_SBM_CLUSTERS))?;
            list("--sbm-edges", &f.sbm_edges, "8,16,32,64,128")?
                .into_iter()
                .map(|e| Ok(Method::Sbm { density: Density::EdgesPerQuery(check_nonneg("--sbm-edges", e)?), clusters, seed, init }))
                .collect::<BResult<_>>()?
        }
        MethodName::Topk => {
            let scorer = if f.topk_scorer.is_some() { TopkScorer::Linear } else { TopkScorer::MeanQuery };
            let window = f.topk_window.unwrap_or(DEFAULT_TOPK_WINDOW);
            ints("--topk-ks", &f.topk_ks, "8,16,32,64,128")?.into_iter().map(|k| Method::TopK { k, window, first: 1, last: 1, scorer }).collect()
        }
        MethodName::Lowrank | MethodName::LowrankPattern => {
            let ranks = ints("--lowrank-ranks", &f.lowrank_ranks, "8,16,32")?;
            let subsets = ints("--lowrank-subsets", &f.lowrank_subsets, "32,64,128")?;
            let densities = match name {
                MethodName::LowrankPattern => list("--lowrank-densities", &f.lowrank_densities, "0.125,0.25,0.5")?
                    .into_iter()
                    .map(|d| check_density("--lowrank-densities", d))
                    .collect::<BResult<Vec<_>>>()?,
                _ => vec![],
            };
            let mut out = Vec::new();
            for &rank in &ranks {
                if rank == 0 {
                    return Err(BenchError::input("--lowrank-ranks: a rank must be at least 1"));
                }
                for &subset in subsets.iter().filter(|&&m| m >= rank) {
                    if name == MethodName::Lowrank {
                        out.push(Method::LowRank { rank, subset });
                    } else {
                        out.extend(densities.iter().map(|&density| Method::LowRankPattern { rank, subset, density }));
                    }
                }
            }
            if out.is_empty() {
                return Err(BenchError::input("--lowrank-subsets: no subset is at least a swept rank (--lowrank-ranks)"));
            }
            out
        }
        MethodName::Mra => {
            let softmax = normalizer == Normalizer::Softmax;
            let modes: Vec<MraMode> = match &f.mra_modes {
                None if softmax => vec![MraMode::Full, MraMode::SparseOnly],
                None => vec![MraMode::SparseOnly],
                Some(s) => {
                    let mut modes = Vec::new();
                    for m in parse_list::<String>("--mra-modes", s)? {
                        let m = MraModeArg::from_str(&m, true).map_err(|_| BenchError::input(format!("--mra-modes: unknown mode `{m}` (full, sparse)")))?.mode();
                        if m == MraMode::Full && !softmax {
                            return Err(mra_full_unsupported(normalizer, "--mra-modes"));
                        }
                        if !modes.contains(&m) {
                            modes.push(m);
                        }
                    }
                    modes
                }
            };
            let bprs = ints("--mra-blocks-per-row", &f.mra_blocks_per_row, "1,2,4,8,16")?;
            if bprs.contains(&0) {
                return Err(BenchError::input("--mra-blocks-per-row: a budget must be at least 1"));
            }
            let mut out = Vec::new();
            for &mode in &modes {
                out.extend(bprs.iter().map(|&b| Method::Mra { blocks_per_row: b as u32, mode }));
            }
            out
        }
    })
}

/// The method at (about) block density `density` for `speed` (synthetic Q/K/V). `None` when the
/// method has no density knob that makes sense there (with the reason).
pub fn for_density(name: MethodName, density: f64, seq: usize, block: u32, seed: u64) -> Result<Method, String> {
    match name {
        MethodName::Dense => Ok(Method::Dense),
        MethodName::Random => Ok(Method::Random { density, seed }),
        MethodName::Window => {
            // A band of `width` tokens covers about width/seq of the key blocks.
            let width = ((density * seq as f64).round() as u32).max(1).min(seq as u32 * 2);
            let _ = block;
            Ok(Method::Window { width })
        }
        MethodName::Global => {
            // first = last = n tokens: about 4n/seq of the pairs.
            let n = ((density * seq as f64 / 4.0).round() as u32).max(1);
            Ok(Method::Global { first: n, last: n })
        }
        MethodName::Sparsefinder => Err("sparsefinder predicts patterns from real Q/K; speed runs on synthetic data (use pareto/quality for it)".into()),
        // SBM and top-k select single elements: `density` sets the element density (edges or keys
        // per query = density * seq); on synthetic Q/K the chosen keys scatter, so the stored
        // block density (speed's `density` column) comes out higher. Training-free variants only.
        MethodName::Sbm => Ok(Method::Sbm {
            density: Density::EdgesPerQuery((density * seq as f64).max(1.0)),
            clusters: DEFAULT_SBM_CLUSTERS,
            seed,
            init: SbmInit::Keys,
        }),
        MethodName::Topk => {
            Ok(Method::TopK { k: ((density * seq as f64).round() as usize).max(1), window: 0, first: 0, last: 0, scorer: TopkScorer::MeanQuery })
        }
        MethodName::Mra => {
            // Budget = density × k_blocks blocks per query-block row (priors included), so the
            // stored block density comes out near `density`. Mode: full; speed adds sparse rows.
            let k_blocks = seq.div_ceil(block.max(1) as usize);
            let blocks_per_row = ((density * k_blocks as f64).round() as u32).max(1);
            Ok(Method::Mra { blocks_per_row, mode: MraMode::Full })
        }
        MethodName::Lowrank | MethodName::LowrankPattern => {
            Err("lowrank needs a basis fitted on real Q/K; speed runs on synthetic data (use pareto/quality for it)".into())
        }
    }
}

/// Loads the Sparsefinder model (`path` or the shipped one) and checks it fits the data.
pub fn load_sparsefinder(path: Option<&Path>, data: Option<&sparse_attn::data::AttentionData>) -> BResult<SparsefinderModel> {
    let path = path.map(Path::to_path_buf).unwrap_or_else(SparsefinderModel::shipped_path);
    if !path.exists() {
        return Err(BenchError::input(format!(
            "sparsefinder model `{}` not found (fit one with `attn-bench fit-sparsefinder --out {}`, or pass the model file)",
            path.display(),
            path.display()
        )));
    }
    let model = SparsefinderModel::load(&path).map_err(|e| BenchError::from(e).context(format!("sparsefinder model `{}`", path.display())))?;
    if let Some(d) = data {
        model
            .check_data(d.layers(), d.heads(), d.head_dim())
            .map_err(|e| BenchError::from(e).context(format!("sparsefinder model `{}` does not fit data `{}`", path.display(), d.path().display())))?;
    }
    Ok(model)
}
