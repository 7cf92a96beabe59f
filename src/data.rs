//! Real attention inputs: per-head Q, K, V of a transformer, stored as safetensors.
//!
//! The file format (DESIGN.md, "Real data"): for each text, tensors `<text>.q`, `<text>.k`,
//! `<text>.v` shaped `[layers, heads, seq, head_dim]` (F16, or F32/BF16) and `<text>.tokens`
//! (I32 or I64) of length `seq`. Every text has the same shape. Optional metadata
//! `layer_ids` / `head_ids` (comma-separated lists) give the original layer and head numbers
//! when the file holds a subset of the model (the test fixture does).
//!
//! The whole file is read into memory once by [`AttentionData::open`] (the full MiniLM file is
//! 28 MB); [`AttentionData::load`] and [`AttentionData::layer`] convert to f32 on demand.

use crate::error::{Error, Result};
use ndarray::Array4;
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The tensors of one text, converted to f32: `[layers, heads, seq, head_dim]`.
#[derive(Clone, Debug)]
pub struct QkvSet {
    pub q: Array4<f32>,
    pub k: Array4<f32>,
    pub v: Array4<f32>,
    pub tokens: Vec<i32>,
}

/// An opened Q/K/V file: the validated header plus the raw bytes.
#[derive(Clone, Debug)]
pub struct AttentionData {
    path: PathBuf,
    bytes: Vec<u8>,
    texts: Vec<String>,
    layers: usize,
    heads: usize,
    seq: usize,
    head_dim: usize,
    layer_ids: Vec<usize>,
    head_ids: Vec<usize>,
    metadata: BTreeMap<String, String>,
}

const PARTS: [&str; 3] = ["q", "k", "v"];

fn is_float(dtype: Dtype) -> bool {
    matches!(dtype, Dtype::F16 | Dtype::BF16 | Dtype::F32)
}

/// Converts elements `[start, start + len)` of a float tensor to f32.
fn floats(view: &TensorView<'_>, start: usize, len: usize) -> Result<Vec<f32>> {
    let data = view.data();
    let (size, convert): (usize, fn(&[u8]) -> f32) = match view.dtype() {
        Dtype::F16 => (2, |b| half::f16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::BF16 => (2, |b| half::bf16::from_le_bytes([b[0], b[1]]).to_f32()),
        Dtype::F32 => (4, |b| f32::from_le_bytes([b[0], b[1], b[2], b[3]])),
        other => return Err(Error::Data(format!("expected a float tensor (F16, BF16 or F32), found {other:?}"))),
    };
    let bytes = data
        .get(start * size..(start + len) * size)
        .ok_or_else(|| Error::Data(format!("tensor data too short: need elements {start}..{} of {}", start + len, data.len() / size)))?;
    Ok(bytes.chunks_exact(size).map(convert).collect())
}

fn ints(view: &TensorView<'_>) -> Result<Vec<i32>> {
    let data = view.data();
    match view.dtype() {
        Dtype::I32 => Ok(data.chunks_exact(4).map(|b| i32::from_le_bytes([b[0], b[1], b[2], b[3]])).collect()),
        Dtype::I64 => data
            .chunks_exact(8)
            .map(|b| {
                let mut a = [0u8; 8];
                a.copy_from_slice(b);
                let x = i64::from_le_bytes(a);
                i32::try_from(x).map_err(|_| Error::Data(format!("token id {x} does not fit in i32")))
            })
            .collect(),
        other => Err(Error::Data(format!("expected integer tokens (I32 or I64), found {other:?}"))),
    }
}

fn parse_ids(metadata: &BTreeMap<String, String>, key: &str, n: usize) -> Result<Vec<usize>> {
    let Some(list) = metadata.get(key) else { return Ok((0..n).collect()) };
    let ids = list
        .split(',')
        .map(|s| s.trim().parse::<usize>().map_err(|e| Error::Data(format!("metadata `{key}` = {list:?}: `{s}` is not an index ({e})"))))
        .collect::<Result<Vec<_>>>()?;
    if ids.len() != n {
        return Err(Error::Data(format!("metadata `{key}` lists {} ids but the tensors have {n}", ids.len())));
    }
    Ok(ids)
}

impl AttentionData {
    /// Reads and validates the file: every text has q, k, v (float, 4-D, one common shape) and
    /// tokens (length `seq`). Missing/unreadable file → [`Error::Io`]; anything malformed →
    /// [`Error::Data`] saying what.
    pub fn open(path: impl AsRef<Path>) -> Result<Self> {
        let path = path.as_ref().to_path_buf();
        let bytes = std::fs::read(&path).map_err(|e| Error::io(&path, e))?;
        let bad = |what: String| Error::Data(format!("{}: {what}", path.display()));
        let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;
        let metadata: BTreeMap<String, String> = header.metadata().clone().unwrap_or_default().into_iter().collect();
        let st = SafeTensors::deserialize(&bytes).map_err(|e| bad(format!("not a valid safetensors file: {e}")))?;

        let mut texts: Vec<String> = st
            .names()
            .into_iter()
            .filter_map(|name| {
                let (text, part) = name.rsplit_once('.')?;
                (PARTS.contains(&part) || part == "tokens").then(|| text.to_string())
            })
            .collect();
        texts.sort();
        texts.dedup();
        if texts.is_empty() {
            return Err(bad("no `<text>.q|k|v|tokens` tensors".into()));
        }

        let mut shape: Option<(Vec<usize>, String)> = None;
        for text in &texts {
            for part in PARTS {
                let name = format!("{text}.{part}");
                let view = st.tensor(&name).map_err(|_| bad(format!("text `{text}` lacks tensor `{name}`")))?;
                if !is_float(view.dtype()) {
                    return Err(bad(format!("`{name}` has dtype {:?}, expected F16, BF16 or F32", view.dtype())));
                }
                if view.shape().len() != 4 || view.shape().contains(&0) {
                    return Err(bad(format!("`{name}` has shape {:?}, expected non-empty [layers, heads, seq, head_dim]", view.shape())));
                }
                match &shape {
                    None => shape = Some((view.shape().to_vec(), name)),
                    Some((s, first)) if s.as_slice() != view.shape() => {
                        return Err(bad(format!("`{name}` has shape {:?} but `{first}` has {s:?}; all q/k/v must agree", view.shape())))
                    }
                    Some(_) => {}
                }
            }
        }
        let Some((s, _)) = shape else { return Err(bad("no q/k/v tensors".into())) };
        let (layers, heads, seq, head_dim) = (s[0], s[1], s[2], s[3]);
        for text in &texts {
            let name = format!("{text}.tokens");
            let view = st.tensor(&name).map_err(|_| bad(format!("text `{text}` lacks tensor `{name}`")))?;
            let n: usize = view.shape().iter().product();
            if !matches!(view.dtype(), Dtype::I32 | Dtype::I64) || view.shape().len() != 1 || n != seq {
                return Err(bad(format!("`{name}` is {:?} {:?}, expected I32 [{seq}]", view.dtype(), view.shape())));
            }
        }
        let layer_ids = parse_ids(&metadata, "layer_ids", layers).map_err(|e| bad(e.to_string()))?;
        let head_ids = parse_ids(&metadata, "head_ids", heads).map_err(|e| bad(e.to_string()))?;
        drop(st);
        Ok(Self { path, bytes, texts, layers, heads, seq, head_dim, layer_ids, head_ids, metadata })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }
    /// Text names, sorted.
    pub fn texts(&self) -> &[String] {
        &self.texts
    }
    pub fn layers(&self) -> usize {
        self.layers
    }
    pub fn heads(&self) -> usize {
        self.heads
    }
    pub fn seq(&self) -> usize {
        self.seq
    }
    pub fn head_dim(&self) -> usize {
        self.head_dim
    }
    /// Original layer number of each stored layer index (metadata `layer_ids`, else `0..layers`).
    pub fn layer_ids(&self) -> &[usize] {
        &self.layer_ids
    }
    /// Original head number of each stored head index (metadata `head_ids`, else `0..heads`).
    pub fn head_ids(&self) -> &[usize] {
        &self.head_ids
    }
    /// The file's `__metadata__` (model, scale, layout, ...).
    pub fn metadata(&self) -> &BTreeMap<String, String> {
        &self.metadata
    }

    fn tensors(&self) -> Result<SafeTensors<'_>> {
        SafeTensors::deserialize(&self.bytes).map_err(|e| Error::Data(format!("{}: {e}", self.path.display())))
    }

    fn check_text(&self, text: &str) -> Result<()> {
        if self.texts.iter().any(|t| t == text) {
            Ok(())
        } else {
            Err(Error::Data(format!("{}: no text `{text}`; available texts: {}", self.path.display(), self.texts.join(", "))))
        }
    }

    /// Elements `[start, start + len)` of `<text>.<part>` as f32, reshaped to `shape`.
    fn part(&self, st: &SafeTensors<'_>, text: &str, part: &str, start: usize, shape: [usize; 4]) -> Result<Array4<f32>> {
        let name = format!("{text}.{part}");
        let view = st.tensor(&name).map_err(|e| Error::Data(format!("{}: `{name}`: {e}", self.path.display())))?;
        let len = shape.iter().product();
        let v = floats(&view, start, len).map_err(|e| Error::Data(format!("{}: `{name}`: {e}", self.path.display())))?;
        Array4::from_shape_vec(shape, v).map_err(|e| Error::Data(format!("{}: `{name}`: {e}", self.path.display())))
    }

    /// All layers of one text as f32 `[layers, heads, seq, head_dim]`, plus its tokens.
    pub fn load(&self, text: &str) -> Result<QkvSet> {
        self.check_text(text)?;
        let st = self.tensors()?;
        let shape = [self.layers, self.heads, self.seq, self.head_dim];
        let name = format!("{text}.tokens");
        let view = st.tensor(&name).map_err(|e| Error::Data(format!("{}: `{name}`: {e}", self.path.display())))?;
        let tokens = ints(&view)?;
        Ok(QkvSet {
            q: self.part(&st, text, "q", 0, shape)?,
            k: self.part(&st, text, "k", 0, shape)?,
            v: self.part(&st, text, "v", 0, shape)?,
            tokens,
        })
    }

    /// One layer of one text as (q, k, v), each `[1, heads, seq, head_dim]` (batch 1), ready for
    /// the engine. `layer` is a stored index `0..layers()` (see [`Self::layer_ids`] for the
    /// original numbers).
    pub fn layer(&self, text: &str, layer: usize) -> Result<(Array4<f32>, Array4<f32>, Array4<f32>)> {
        self.check_text(text)?;
        if layer >= self.layers {
            return Err(Error::Data(format!(
                "{}: layer index {layer} out of range 0..{} (original layer ids {:?})",
                self.path.display(),
                self.layers,
                self.layer_ids
            )));
        }
        let st = self.tensors()?;
        let shape = [1, self.heads, self.seq, self.head_dim];
        let start = layer * self.heads * self.seq * self.head_dim;
        Ok((
            self.part(&st, text, "q", start, shape)?,
            self.part(&st, text, "k", start, shape)?,
            self.part(&st, text, "v", start, shape)?,
        ))
    }
}

/// The small fixture shipped with the crate: `tests/fixtures/minilm_small.safetensors`.
pub fn fixture_path() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join("minilm_small.safetensors")
}

/// The full data file: `$SPARSE_ATTN_DATA` if set, else `../shared/data/minilm_qkv.safetensors`
/// next to the crate.
pub fn default_data_path() -> PathBuf {
    match std::env::var_os("SPARSE_ATTN_DATA") {
        Some(p) if !p.is_empty() => PathBuf::from(p),
        _ => Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join("shared").join("data").join("minilm_qkv.safetensors"),
    }
}
