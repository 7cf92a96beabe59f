//! The real Q/K/V data: opening the file, choosing texts and layers, and the per-layer ground
//! truth (exact entmax-1.5 support and exact dense output) every quality measure compares with.

use crate::common::{BResult, BenchError};
use ndarray::{Array4, Axis};
use sparse_attn::data::{default_data_path, fixture_path, AttentionData};
use sparse_attn::metrics::{gold_support, GoldSupport};
use sparse_attn::patterns::Dense;
use sparse_attn::{reference, AttentionShape, Normalizer};
use std::path::{Path, PathBuf};

/// Recall is always measured against this α's exact support (DESIGN.md).
pub const GOLD_ALPHA: f64 = 1.5;

/// `--data` when given; else `$SPARSE_ATTN_DATA` / `../shared/data/minilm_qkv.safetensors` when it
/// exists; else the bundled fixture.
pub fn resolve_data_path(flag: Option<&Path>) -> PathBuf {
    if let Some(p) = flag {
        return p.to_path_buf();
    }
    let full = default_data_path();
    if full.exists() || std::env::var_os("SPARSE_ATTN_DATA").is_some_and(|v| !v.is_empty()) {
        full
    } else {
        fixture_path()
    }
}

pub fn open(path: &Path) -> BResult<AttentionData> {
    if !path.exists() {
        return Err(BenchError::input(format!(
            "data file `{}` not found (pass --data FILE; the bundled fixture is {})",
            path.display(),
            fixture_path().display()
        )));
    }
    AttentionData::open(path).map_err(BenchError::from)
}

/// A text by name, or an error listing the available ones.
pub fn check_text(data: &AttentionData, text: &str) -> BResult<String> {
    if data.texts().iter().any(|t| t == text) {
        Ok(text.to_string())
    } else {
        Err(BenchError::input(format!("unknown text `{text}` in {}; available: {}", data.path().display(), data.texts().join(", "))))
    }
}

/// The stored index of original layer id `layer`, or an error listing the ids.
pub fn layer_index(data: &AttentionData, layer: usize) -> BResult<usize> {
    data.layer_ids().iter().position(|&l| l == layer).ok_or_else(|| {
        let ids: Vec<String> = data.layer_ids().iter().map(|l| l.to_string()).collect();
        BenchError::input(format!("unknown layer {layer} in {}; available layers: {}", data.path().display(), ids.join(", ")))
    })
}

/// `--texts` (comma list) or every text.
pub fn select_texts(data: &AttentionData, flag: Option<&str>) -> BResult<Vec<String>> {
    match flag {
        None => Ok(data.texts().to_vec()),
        Some(s) => crate::common::parse_list::<String>("--texts", s)?.iter().map(|t| check_text(data, t)).collect(),
    }
}

/// `--layers` (original ids, comma list) or every layer: (stored index, original id).
pub fn select_layers(data: &AttentionData, flag: Option<&str>) -> BResult<Vec<(usize, usize)>> {
    match flag {
        None => Ok(data.layer_ids().iter().copied().enumerate().collect()),
        Some(s) => crate::common::parse_list::<usize>("--layers", s)?.into_iter().map(|l| Ok((layer_index(data, l)?, l))).collect(),
    }
}

/// One (text, layer) of the data with its ground truth.
pub struct LayerCase {
    /// Text of the data file.
    pub text: String,
    /// Stored layer index in the file.
    pub layer_index: usize,
    pub q: Array4<f32>,
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    pub shape: AttentionShape,
    /// Exact entmax-1.5 support per head (dense scores, CPU f64).
    pub gold: Vec<GoldSupport>,
    /// Exact dense attention with the run's normaliser (CPU f64), when asked for.
    pub exact: Option<Array4<f32>>,
    pub gold_ms: f64,
    pub exact_ms: f64,
}

impl LayerCase {
    pub fn load(data: &AttentionData, text: &str, layer_index: usize, normalizer: Option<Normalizer>) -> BResult<Self> {
        let (q, k, v) = data.layer(text, layer_index)?;
        let shape = AttentionShape::new(1, data.heads(), data.seq(), data.head_dim());
        let scale = shape.default_scale() as f64;
        let t = std::time::Instant::now();
        let gold = (0..shape.heads)
            .map(|h| {
                let qh = q.index_axis(Axis(0), 0).index_axis_move(Axis(0), h);
                let kh = k.index_axis(Axis(0), 0).index_axis_move(Axis(0), h);
                gold_support(&qh, &kh, scale, GOLD_ALPHA, false)
            })
            .collect::<Result<_, _>>()?;
        let gold_ms = crate::common::ms_since(t);
        let t = std::time::Instant::now();
        let exact = match normalizer {
            Some(n) => {
                let dense = Dense::new().build(&shape)?;
                Some(reference::attention(&q, &k, &v, &dense, n)?)
            }
            None => None,
        };
        let exact_ms = crate::common::ms_since(t);
        Ok(Self { text: text.to_string(), layer_index, q, k, v, shape, gold, exact, gold_ms, exact_ms })
    }

    /// Mean exact entmax-1.5 support per query, over heads.
    pub fn gold_mean_support(&self) -> f64 {
        crate::common::mean(&self.gold.iter().map(|g| g.mean_support()).collect::<Vec<_>>())
    }
}
