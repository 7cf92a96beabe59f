//! Sparsefinder (Treviso et al. 2022, "Predicting Attention Sparsity in Transformers").
//!
//! Per (layer, head) the method learns two small linear maps `q' = q·W_q + b_q`,
//! `k' = k·W_k + b_k` (projection dim `r`, paper default 4) so that a query lands near the keys in
//! its exact α-entmax support and far from the others (triplet hinge loss
//! `relu(margin + ‖q'−k'₊‖² − ‖q'−k'₋‖²)` over gold positives and sampled negatives, Adam,
//! seeded ChaCha, hand-written gradients). The attention graph is then predicted in the projected
//! space in one of three ways ([`Variant`]):
//!
//! - **distance**: pairs with `‖q'−k'‖² <= t`; `t` absolute, calibrated per head to a target
//!   recall on the fitting data ([`Threshold::Recall`]), or allocated across heads for a target
//!   mean recall ([`Threshold::MeanRecall`]);
//! - **quantization**: per projected coordinate, the keys are sorted and cut into buckets of
//!   `bucket_size` keys; each query joins the bucket its value falls in (the keys' bounds); a pair
//!   is kept when it shares a bucket in any coordinate;
//! - **clustering**: k-means centroids fitted on the projected queries and keys; each key joins
//!   its nearest centroid, each query its `query_top` nearest; a pair is kept when it shares one.
//!
//! Every predicted pattern also holds a local window (paper: 11 tokens) and the first/last tokens
//! (Longformer-style global tokens, exactly as [`crate::patterns::Window`] ∪
//! [`crate::patterns::GlobalTokens`]: every query sees them and, with `global_queries`, they see
//! every key). Gold pairs these already cover are left out of the loss and the calibration.
//!
//! Where this implementation goes beyond the paper (each measured on MiniLM, see
//! `examples/sparsefinder_quality.rs`):
//! - an optional absolute hinge (`absolute_weight`, default on): the triplet loss only orders
//!   keys per query, while the distance variant uses one threshold per head; pulling positives
//!   inside a common radius makes that threshold fit every query;
//! - the quantization variant has its own projection trained with the min-coordinate distance
//!   `min_c (q'_c − k'_c)²` (an option of the paper's code), and queries are bucketed with the
//!   keys' bounds (the code's `enforce_same_bounds`): separate equal-size query buckets do not
//!   align with the key buckets and lose most of the recall;
//! - [`Threshold::MeanRecall`]: one trade-off rate for all heads instead of one recall per head.
//!
//! ```no_run
//! use sparse_attn::patterns::sparsefinder::{Sparsefinder, SparsefinderModel, Threshold, Variant};
//! let model = SparsefinderModel::load(SparsefinderModel::shipped_path())?;
//! let q = ndarray::Array4::<f32>::zeros((1, 12, 512, 32));
//! let k = q.clone();
//! let spec = Sparsefinder::new(Variant::Distance { threshold: Threshold::Recall(0.95) }).with_blocks(32, 32);
//! let pattern = model.build(0, &q, &k, &spec)?; // one pattern slice per head
//! # Ok::<(), sparse_attn::Error>(())
//! ```
//!
//! Fitting is [`fit`] on [`HeadSamples`] (or [`fit_from_data`] on a Q/K/V safetensors file);
//! projection is a separate step ([`SparsefinderModel::project`], [`project_rows`]) so it can be
//! done elsewhere (e.g. on the GPU) and handed to [`SparsefinderModel::build_projected`].
//! Prediction never holds an `n × n` matrix: pairs are emitted one query-block row at a time.

mod fit;
mod gpu;
pub(crate) mod kmeans;
mod model;
mod predict;

pub use fit::{fit, fit_from_data, samples_from_data, HeadSamples};
pub use model::{Centroids, FitInfo, HeadModel, Projection, SparsefinderModel, MODEL_FORMAT, MODEL_VERSION};
pub use gpu::GPU_PROJECTION_MIN_SEQ;
pub use predict::{project_rows, Projected, Sparsefinder};

use crate::error::{Error, Result};

/// Fitting and structural settings. Defaults follow the paper where it says (r = 4, margin 1,
/// Adam, window 11, first/last token); the rest are this implementation's choices.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct SparsefinderConfig {
    /// Projection dimension r.
    pub rank: usize,
    /// Hinge margin ω.
    pub margin: f64,
    /// Adam learning rate.
    pub learning_rate: f64,
    /// Passes over all sampled queries.
    pub epochs: usize,
    /// Queries per Adam step.
    pub batch_queries: usize,
    /// Positives sampled per query per epoch (all of them when the support is smaller).
    pub positives_per_query: usize,
    /// Negatives (keys outside the gold support) sampled per positive.
    pub negatives_per_positive: usize,
    /// Weight λ of the absolute-distance hinge added to the paper's triplet loss:
    /// `λ·(relu(‖q'−k'₊‖² − (R − ω/2)) + relu((R + ω/2) − ‖q'−k'₋‖²))`. The triplet loss only
    /// orders keys per query; this term puts every query's positives inside one radius `R`, so a
    /// single per-head distance threshold fits all queries. 0 = the paper's loss alone.
    pub absolute_weight: f64,
    /// The radius `R` of the absolute hinge (squared distance).
    pub radius: f64,
    /// Also train a projection with the min-coordinate distance `min_c (q'_c − k'_c)²` for the
    /// quantization variant (the paper's code trains quantization models so); false = the
    /// quantization variant reuses the Euclidean projection.
    pub quantization_min_distance: bool,
    /// Local window width in tokens (symmetric; causal models use the causal window).
    pub window: u32,
    /// Leading global tokens.
    pub first: u32,
    /// Trailing global tokens.
    pub last: u32,
    /// Whether the global tokens also attend to every key (Longformer), not only get attended.
    pub global_queries: bool,
    /// Decoder-style masking: query `i` only sees keys `j <= i + seq_kv − seq_q`.
    pub causal: bool,
    /// Score scale; `None` = `1/sqrt(head_dim)`.
    pub scale: Option<f64>,
    /// Seed of every random choice (initialisation, sampling, k-means).
    pub seed: u64,
    /// Recall levels at which the per-head distance threshold is calibrated (ascending, in (0, 1]).
    pub calibration_recalls: Vec<f64>,
    /// Cluster counts for which k-means centroids are fitted per head.
    pub cluster_counts: Vec<usize>,
    /// Lloyd iterations of k-means.
    pub kmeans_iterations: usize,
    /// Seeded k-means runs per cluster count; the one with the least inertia is kept.
    pub kmeans_restarts: usize,
    /// Worker threads for fitting (heads in parallel); 0 = available parallelism. Results do not
    /// depend on it.
    pub threads: usize,
}

impl Default for SparsefinderConfig {
    fn default() -> Self {
        Self {
            rank: 4,
            margin: 1.0,
            learning_rate: 1e-2,
            epochs: 20,
            batch_queries: 64,
            positives_per_query: 16,
            negatives_per_positive: 2,
            absolute_weight: 1.0,
            radius: 1.0,
            quantization_min_distance: true,
            window: 11,
            first: 1,
            last: 1,
            global_queries: true,
            causal: false,
            scale: None,
            seed: 0,
            calibration_recalls: vec![
                0.5, 0.6, 0.7, 0.75, 0.8, 0.85, 0.875, 0.9, 0.91, 0.92, 0.93, 0.94, 0.95, 0.96, 0.97, 0.975, 0.98, 0.985, 0.99,
                0.995, 1.0,
            ],
            cluster_counts: vec![4, 8, 16, 32],
            kmeans_iterations: 50,
            kmeans_restarts: 4,
            threads: 0,
        }
    }
}

impl SparsefinderConfig {
    /// Checks every field's domain, naming the first bad one.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Data(format!("sparsefinder config: {what}")));
        if self.rank == 0 {
            return bad("rank must be at least 1".into());
        }
        if !(self.margin.is_finite() && self.margin > 0.0) {
            return bad(format!("margin must be positive, got {}", self.margin));
        }
        if !(self.learning_rate.is_finite() && self.learning_rate > 0.0) {
            return bad(format!("learning_rate must be positive, got {}", self.learning_rate));
        }
        if !(self.absolute_weight.is_finite() && self.absolute_weight >= 0.0) {
            return bad(format!("absolute_weight must be non-negative, got {}", self.absolute_weight));
        }
        if !(self.radius.is_finite() && self.radius > self.margin / 2.0) {
            return bad(format!("radius {} must exceed margin / 2 = {}", self.radius, self.margin / 2.0));
        }
        if self.batch_queries == 0 || self.positives_per_query == 0 || self.negatives_per_positive == 0 {
            return bad("batch_queries, positives_per_query and negatives_per_positive must be at least 1".into());
        }
        if self.window == 0 {
            return bad("window must be at least 1 token".into());
        }
        if let Some(s) = self.scale {
            if !(s.is_finite() && s > 0.0) {
                return bad(format!("scale must be positive, got {s}"));
            }
        }
        if self.calibration_recalls.is_empty() {
            return bad("calibration_recalls is empty".into());
        }
        for w in self.calibration_recalls.windows(2) {
            if w[1] <= w[0] {
                return bad(format!("calibration_recalls must be strictly increasing ({} then {})", w[0], w[1]));
            }
        }
        if let Some(r) = self.calibration_recalls.iter().find(|&&r| !(r > 0.0 && r <= 1.0)) {
            return bad(format!("calibration recall {r} outside (0, 1]"));
        }
        if let Some(c) = self.cluster_counts.iter().find(|&&c| c == 0) {
            return bad(format!("cluster count {c} must be at least 1"));
        }
        Ok(())
    }
}

/// Distance threshold of the distance variant.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Threshold {
    /// The per-head squared distance calibrated on the fitting data to reach this recall of the
    /// gold support (window and global tokens included); interpolated between calibrated levels.
    Recall(f64),
    /// Thresholds allocated across all heads of the model so that the recall averaged over heads
    /// reaches this value on the fitting data at the least mean density (one trade-off rate for
    /// every head: heads where recall is cheap keep more of it). Usually sparser than
    /// [`Threshold::Recall`] at the same mean recall.
    MeanRecall(f64),
    /// One absolute squared distance for every head.
    Distance(f64),
}

/// How pairs are predicted in the projected space.
#[derive(Clone, Copy, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub enum Variant {
    /// Keep pairs with `‖q'−k'‖² <= threshold`. Scans every pair (O(n²·r) time, O(nnz) memory).
    Distance { threshold: Threshold },
    /// Keep pairs sharing a rank bucket of `bucket_size` tokens in any projected coordinate.
    Quantization { bucket_size: usize },
    /// Keep pairs sharing a k-means cluster: keys in their nearest centroid, queries in their
    /// `query_top` nearest (paper: 16 clusters, top 2). `clusters` must be one the model fitted.
    Clustering { clusters: usize, query_top: usize },
}

impl Variant {
    /// The paper's clustering setting: 16 clusters, each query in its top 2.
    pub const CLUSTERING_DEFAULT: Variant = Variant::Clustering { clusters: 16, query_top: 2 };

    /// `distance`, `quantization` or `clustering`.
    pub fn name(&self) -> &'static str {
        match self {
            Variant::Distance { .. } => "distance",
            Variant::Quantization { .. } => "quantization",
            Variant::Clustering { .. } => "clustering",
        }
    }

    /// The knob and its value as text, e.g. `("recall", "0.95")`, `("bucket_size", "32")`,
    /// `("clusters/top", "16/2")`.
    pub fn knob(&self) -> (&'static str, String) {
        match self {
            Variant::Distance { threshold: Threshold::Recall(r) } => ("recall", format!("{r}")),
            Variant::Distance { threshold: Threshold::MeanRecall(r) } => ("mean_recall", format!("{r}")),
            Variant::Distance { threshold: Threshold::Distance(t) } => ("distance", format!("{t}")),
            Variant::Quantization { bucket_size } => ("bucket_size", bucket_size.to_string()),
            Variant::Clustering { clusters, query_top } => ("clusters/top", format!("{clusters}/{query_top}")),
        }
    }

    pub(crate) fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Unsupported(format!("sparsefinder variant: {what}")));
        match *self {
            Variant::Distance { threshold: Threshold::Recall(r) | Threshold::MeanRecall(r) } if !(r > 0.0 && r <= 1.0) => {
                bad(format!("target recall {r} outside (0, 1]"))
            }
            Variant::Distance { threshold: Threshold::Distance(t) } if t.is_nan() => bad("distance threshold is NaN".into()),
            Variant::Quantization { bucket_size: 0 } => bad("bucket_size must be at least 1".into()),
            Variant::Clustering { clusters, query_top } if query_top == 0 || query_top > clusters => {
                bad(format!("query_top {query_top} must lie in 1..={clusters}"))
            }
            _ => Ok(()),
        }
    }
}
