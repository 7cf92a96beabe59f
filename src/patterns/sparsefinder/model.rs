//! The fitted model: per (layer, head) projections, calibrated thresholds and centroids; versioned
//! JSON persistence and the checks that a model fits an input.

use super::{SparsefinderConfig, Threshold, Variant};
use crate::error::{Error, Result};
use std::path::{Path, PathBuf};

/// Version of the JSON model format this build reads and writes.
pub const MODEL_VERSION: u32 = 1;
/// `format` field of a model file.
pub const MODEL_FORMAT: &str = "sparse-attn/sparsefinder";

/// k-means centroids of one head for one cluster count: `clusters × rank`, row-major.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Centroids {
    pub clusters: usize,
    pub centroids: Vec<f32>,
}

/// One pair of linear maps `q' = q·W_q + b_q`, `k' = k·W_k + b_k`.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Projection {
    /// `head_dim × rank`, row-major: `q'[c] = Σ_a q[a]·w_q[a·rank + c] + b_q[c]`.
    pub w_q: Vec<f32>,
    pub b_q: Vec<f32>,
    pub w_k: Vec<f32>,
    pub b_k: Vec<f32>,
}

/// What one (layer, head) learned.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct HeadModel {
    pub layer: usize,
    pub head: usize,
    /// Trained with the squared Euclidean distance: used by the distance and clustering variants.
    pub distance: Projection,
    /// Trained with the min-coordinate distance `min_c (q'_c − k'_c)²` (as the paper's code does
    /// for quantization); `None` = the quantization variant uses `distance`.
    pub quantization: Option<Projection>,
    /// `(recall, squared distance)` pairs, recall ascending: the threshold reaching that recall of
    /// the gold support on the fitting data (window and global tokens counted as found). A
    /// negative distance means the window and global tokens alone reach it.
    pub distance_curve: Vec<(f32, f32)>,
    /// `(mean recall, squared distance)` pairs: this head's share of a model-wide allocation
    /// reaching that recall averaged over all heads at the least mean density on the fitting
    /// data (heads whose recall is cheap get more of it).
    pub mean_recall_curve: Vec<(f32, f32)>,
    /// Centroids per fitted cluster count.
    pub clusterings: Vec<Centroids>,
    /// Mean loss of the last epoch (distance projection).
    pub final_loss: f64,
    /// Mean loss of the last epoch (quantization projection).
    pub quantization_loss: f64,
    /// Mean gold support size per query on the fitting data.
    pub mean_support: f64,
}

impl HeadModel {
    /// The projection a variant uses.
    pub fn projection(&self, variant: &Variant) -> &Projection {
        match (variant, &self.quantization) {
            (Variant::Quantization { .. }, Some(p)) => p,
            _ => &self.distance,
        }
    }

    /// The squared distance threshold of `threshold` for this head.
    pub fn distance_threshold(&self, threshold: Threshold) -> Result<f64> {
        let (curve, name) = match threshold {
            Threshold::Distance(t) => return Ok(t),
            Threshold::Recall(r) => (&self.distance_curve, r),
            Threshold::MeanRecall(r) => (&self.mean_recall_curve, r),
        };
        let (Some(&first), Some(&last)) = (curve.first(), curve.last()) else {
            return Err(Error::Data(format!("layer {} head {}: no calibrated thresholds for {threshold:?}", self.layer, self.head)));
        };
        let r = name;
        if r <= first.0 as f64 {
            return Ok(first.1 as f64);
        }
        if r >= last.0 as f64 {
            return Ok(last.1 as f64);
        }
        let i = curve.partition_point(|&(x, _)| (x as f64) < r);
        let ((r0, t0), (r1, t1)) = (curve[i - 1], curve[i]);
        let (r0, t0, r1, t1) = (r0 as f64, t0 as f64, r1 as f64, t1 as f64);
        if r1 <= r0 {
            return Ok(t1);
        }
        Ok(t0 + (t1 - t0) * (r - r0) / (r1 - r0))
    }

    /// The centroids fitted for `clusters`, or an error listing the available counts.
    pub fn centroids(&self, clusters: usize) -> Result<&Centroids> {
        self.clusterings.iter().find(|c| c.clusters == clusters).ok_or_else(|| {
            let have: Vec<String> = self.clusterings.iter().map(|c| c.clusters.to_string()).collect();
            Error::Unsupported(format!(
                "the sparsefinder model has no k-means with {clusters} clusters (fitted: {}); refit with that count in `cluster_counts`",
                have.join(", ")
            ))
        })
    }
}

/// Provenance of a fit.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct FitInfo {
    /// File name of the data the samples came from, if any.
    pub data: Option<String>,
    /// Texts used for fitting.
    pub texts: Vec<String>,
    /// Wall time of the fit in seconds.
    pub fit_seconds: f64,
    /// Free-form note (attribution of the data, etc.).
    pub note: String,
}

/// A fitted Sparsefinder model: one [`HeadModel`] per (layer, head), layer-major.
#[derive(Clone, Debug, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct SparsefinderModel {
    pub(crate) format: String,
    pub(crate) version: u32,
    pub(crate) alpha: f64,
    pub(crate) scale: f64,
    pub(crate) layers: usize,
    pub(crate) heads: usize,
    pub(crate) head_dim: usize,
    pub(crate) rank: usize,
    pub(crate) config: SparsefinderConfig,
    pub(crate) fit_info: FitInfo,
    pub(crate) head_models: Vec<HeadModel>,
}

/// `x` rounded to 12 significant digits: such values survive a JSON round trip bit for bit
/// (serde_json parses short decimals exactly), so a saved and reloaded model compares equal.
pub(crate) fn round12(x: f64) -> f64 {
    if x == 0.0 || !x.is_finite() {
        return x;
    }
    format!("{x:.11e}").parse().unwrap_or(x)
}

fn finite(v: &[f32]) -> bool {
    v.iter().all(|x| x.is_finite())
}

impl SparsefinderModel {
    pub(crate) fn new(
        alpha: f64,
        scale: f64,
        dims: (usize, usize, usize),
        config: SparsefinderConfig,
        fit_info: FitInfo,
        head_models: Vec<HeadModel>,
    ) -> Result<Self> {
        let (layers, heads, head_dim) = dims;
        let model = Self {
            format: MODEL_FORMAT.into(),
            version: MODEL_VERSION,
            alpha,
            scale,
            layers,
            heads,
            head_dim,
            rank: config.rank,
            config,
            fit_info,
            head_models,
        };
        model.validate()?;
        Ok(model)
    }

    /// The model shipped with the crate, fitted on MiniLM (`models/sparsefinder_minilm.json`).
    pub fn shipped_path() -> PathBuf {
        Path::new(env!("CARGO_MANIFEST_DIR")).join("models").join("sparsefinder_minilm.json")
    }

    pub fn version(&self) -> u32 {
        self.version
    }
    /// The entmax α whose support the model predicts.
    pub fn alpha(&self) -> f64 {
        self.alpha
    }
    /// Score scale used for the gold support.
    pub fn scale(&self) -> f64 {
        self.scale
    }
    pub fn layers(&self) -> usize {
        self.layers
    }
    pub fn heads(&self) -> usize {
        self.heads
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Projection dimension r.
    pub fn rank(&self) -> usize {
        self.rank
    }
    pub fn config(&self) -> &SparsefinderConfig {
        &self.config
    }
    pub fn fit_info(&self) -> &FitInfo {
        &self.fit_info
    }
    pub fn fit_info_mut(&mut self) -> &mut FitInfo {
        &mut self.fit_info
    }
    /// All heads, layer-major.
    pub fn head_models(&self) -> &[HeadModel] {
        &self.head_models
    }

    /// The model of (layer, head); out of range → [`Error::Shape`].
    pub fn head(&self, layer: usize, head: usize) -> Result<&HeadModel> {
        self.check_layer(layer)?;
        if head >= self.heads {
            return Err(Error::Shape(format!("head {head} out of range: the sparsefinder model has {} heads", self.heads)));
        }
        self.head_models
            .get(layer * self.heads + head)
            .ok_or_else(|| Error::Data(format!("sparsefinder model lacks layer {layer} head {head}")))
    }

    /// Layer index in range, else [`Error::Shape`] naming the model's layer count.
    pub fn check_layer(&self, layer: usize) -> Result<()> {
        if layer >= self.layers {
            return Err(Error::Shape(format!(
                "layer {layer} out of range: the sparsefinder model has {} layers (0..{})",
                self.layers, self.layers
            )));
        }
        Ok(())
    }

    /// Checks an input's heads and head_dim against the model ([`Error::Shape`] naming both).
    pub fn check_input(&self, layer: usize, heads: usize, head_dim: usize) -> Result<()> {
        self.check_layer(layer)?;
        if head_dim != self.head_dim {
            return Err(Error::Shape(format!(
                "input head_dim is {head_dim} but the sparsefinder model was fitted for head_dim {}",
                self.head_dim
            )));
        }
        if heads != self.heads {
            return Err(Error::Shape(format!("input has {heads} heads but the sparsefinder model has {} heads per layer", self.heads)));
        }
        Ok(())
    }

    /// Checks that a whole data set (layers × heads × head_dim) matches the model.
    pub fn check_data(&self, layers: usize, heads: usize, head_dim: usize) -> Result<()> {
        if layers != self.layers {
            return Err(Error::Shape(format!("the data has {layers} layers but the sparsefinder model has {}", self.layers)));
        }
        self.check_input(0, heads, head_dim)
    }

    /// Every structural invariant of a model (what `load` relies on), naming the first broken one.
    pub fn validate(&self) -> Result<()> {
        let bad = |what: String| Err(Error::Data(format!("sparsefinder model: {what}")));
        if self.format != MODEL_FORMAT {
            return bad(format!("format is `{}`, expected `{MODEL_FORMAT}`", self.format));
        }
        if self.version != MODEL_VERSION {
            return bad(format!("version {} but this build reads version {MODEL_VERSION}", self.version));
        }
        if self.layers == 0 || self.heads == 0 || self.head_dim == 0 || self.rank == 0 {
            return bad(format!(
                "layers {}, heads {}, head_dim {}, rank {}: all must be at least 1",
                self.layers, self.heads, self.head_dim, self.rank
            ));
        }
        if self.rank != self.config.rank {
            return bad(format!("rank {} differs from config.rank {}", self.rank, self.config.rank));
        }
        if !(self.alpha > 1.0 && self.alpha <= 2.0 && self.scale.is_finite() && self.scale > 0.0) {
            return bad(format!("alpha {} must lie in (1, 2] and scale {} be positive", self.alpha, self.scale));
        }
        if self.head_models.len() != self.layers * self.heads {
            return bad(format!("{} head models, expected layers × heads = {}", self.head_models.len(), self.layers * self.heads));
        }
        let (d, r) = (self.head_dim, self.rank);
        for (idx, h) in self.head_models.iter().enumerate() {
            let (layer, head) = (idx / self.heads, idx % self.heads);
            if (h.layer, h.head) != (layer, head) {
                return bad(format!("entry {idx} is layer {} head {}, expected layer {layer} head {head}", h.layer, h.head));
            }
            let at = format!("layer {layer} head {head}");
            for (which, p) in std::iter::once(("distance", &h.distance)).chain(h.quantization.as_ref().map(|p| ("quantization", p))) {
                for (name, v, n) in [("w_q", &p.w_q, d * r), ("w_k", &p.w_k, d * r), ("b_q", &p.b_q, r), ("b_k", &p.b_k, r)] {
                    if v.len() != n {
                        return bad(format!("{at}: {which}.{name} has {} values, expected {n}", v.len()));
                    }
                    if !finite(v) {
                        return bad(format!("{at}: {which}.{name} holds a non-finite value"));
                    }
                }
            }
            for (name, curve) in [("distance_curve", &h.distance_curve), ("mean_recall_curve", &h.mean_recall_curve)] {
                if curve.is_empty() {
                    return bad(format!("{at}: empty {name}"));
                }
                for w in curve.windows(2) {
                    if w[1].0 <= w[0].0 || w[1].1 < w[0].1 {
                        return bad(format!("{at}: {name} not increasing at {:?} -> {:?}", w[0], w[1]));
                    }
                }
                if curve.iter().any(|&(x, t)| !(x.is_finite() && t.is_finite())) {
                    return bad(format!("{at}: {name} holds a non-finite value"));
                }
            }
            for c in &h.clusterings {
                if c.clusters == 0 || c.centroids.len() != c.clusters * r || !finite(&c.centroids) {
                    return bad(format!("{at}: k-means with {} clusters has {} centroid values (expected {}, finite)", c.clusters, c.centroids.len(), c.clusters * r));
                }
            }
        }
        Ok(())
    }

    /// The model as JSON text.
    pub fn to_json(&self) -> Result<String> {
        serde_json::to_string(self).map_err(|e| Error::Data(format!("sparsefinder model: cannot serialise: {e}")))
    }

    /// Parses and validates a model; another `version` (or format) is an [`Error::Data`] naming it.
    pub fn from_json(text: &str) -> Result<Self> {
        let value: serde_json::Value =
            serde_json::from_str(text).map_err(|e| Error::Data(format!("sparsefinder model: not valid JSON: {e}")))?;
        let format = value.get("format").and_then(|v| v.as_str()).unwrap_or("");
        if format != MODEL_FORMAT {
            return Err(Error::Data(format!("sparsefinder model: format is `{format}`, expected `{MODEL_FORMAT}`")));
        }
        match value.get("version").and_then(|v| v.as_u64()) {
            Some(v) if v == MODEL_VERSION as u64 => {}
            Some(v) => {
                return Err(Error::Data(format!("sparsefinder model: version {v} but this build reads version {MODEL_VERSION}")))
            }
            None => return Err(Error::Data("sparsefinder model: no integer `version` field".into())),
        }
        let model: Self =
            serde_json::from_value(value).map_err(|e| Error::Data(format!("sparsefinder model: malformed: {e}")))?;
        model.validate()?;
        Ok(model)
    }

    /// Writes the model as JSON.
    pub fn save(&self, path: impl AsRef<Path>) -> Result<()> {
        let path = path.as_ref();
        let text = self.to_json()?;
        std::fs::write(path, text).map_err(|e| Error::io(path, e))
    }

    /// Reads and validates a model written by [`Self::save`].
    pub fn load(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref();
        let text = std::fs::read_to_string(path).map_err(|e| Error::io(path, e))?;
        Self::from_json(&text).map_err(|e| match e {
            Error::Data(m) => Error::Data(format!("{}: {m}", path.display())),
            other => other,
        })
    }
}
