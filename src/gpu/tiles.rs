//! Fused-kernel tiles: the candidate set, the workgroup-memory model that filters it per
//! adapter, and the cache of tuned choices (in memory, optionally on disk).

use crate::error::{Error, Result};
use std::collections::HashMap;
use std::sync::Mutex;

/// One fused-kernel tile: `tq` query rows per workgroup, `kc` keys staged per step, `wg`
/// threads, `dp` head_dim padded, `cap` entmax candidates kept per row, `rq` query rows per
/// thread of the register-tiled softmax kernel (0 for the entmax kernel's row-per-lanes layout).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FusedTile {
    pub tq: u32,
    pub kc: u32,
    pub wg: u32,
    pub dp: u32,
    pub cap: u32,
    #[serde(default)]
    pub rq: u32,
}

impl FusedTile {
    /// Threads per query row.
    pub fn tpr(&self) -> u32 {
        self.wg / self.tq
    }

    /// Softmax kernel: lanes per row group (`wg / (tq / rq)`).
    pub fn lanes(&self) -> u32 {
        self.wg / (self.tq / self.rq.max(1)).max(1)
    }

    /// Trip counts of the kernels' `@unroll` loops (src/gpu/unroll.rs): the softmax kernel's
    /// register tiles (RQ, NK, NC) and the entmax kernel's columns per thread (CPT).
    pub fn unroll_counts(&self) -> [(&'static str, u32); 4] {
        let lanes = self.lanes().max(1);
        [("RQ", self.rq.max(1)), ("NK", self.kc / lanes), ("NC", (self.dp / 4).div_ceil(lanes)), ("CPT", self.dp.div_ceil(self.tpr().max(1)))]
    }

    /// Workgroup memory in bytes (mirrors the arrays in shaders/fused_*.wgsl).
    pub fn workgroup_bytes(&self, entmax: bool) -> u32 {
        if !entmax {
            // fused_tiles.wgsl: padded Q and K tiles, V tile, padded p tile, row reductions.
            let dp4 = self.dp / 4;
            return 16 * (self.tq * (dp4 + 1) + self.kc * (dp4 + 1) + self.kc * dp4) + 4 * (self.tq * (self.kc + 1) + self.tq * self.lanes());
        }
        let common = 4 * (self.tq * self.dp + 2 * self.kc * self.dp + self.tq * self.kc);
        if entmax {
            common + 4 * self.tq * self.cap + 16 * self.wg + 4 * self.wg + 4
        } else {
            common + 4 * self.wg
        }
    }
}

/// Entmax candidates kept on chip per thread: a row keeps `16 · threads-per-row` of its largest
/// scores (rows whose support does not fit recompute their scores instead).
pub const ENTMAX_CANDIDATES_PER_THREAD: u32 = 16;
/// Largest head_dim a fused tile supports.
pub const MAX_FUSED_HEAD_DIM: u32 = 256;

/// The entmax kernel's candidate set, best guess first: (threads, query rows, keys per step).
/// The last one is the fallback for small workgroup memory and large head_dim.
const CANDIDATES: [(u32, u32, u32); 6] = [(128, 32, 32), (128, 16, 32), (128, 16, 16), (256, 32, 16), (128, 8, 16), (64, 4, 8)];

/// The softmax kernel's candidate set, best guess first: (threads, query rows, rows per thread,
/// keys per step). Larger register tiles feed more multiply-adds per workgroup-memory read;
/// the last ones fit block 16, large head_dim and small workgroup memory.
const SOFTMAX_CANDIDATES: [(u32, u32, u32, u32); 9] =
    [(128, 32, 4, 32), (128, 16, 2, 32), (128, 64, 8, 64), (256, 64, 4, 64), (64, 32, 4, 32), (256, 32, 2, 32), (64, 16, 2, 16), (64, 8, 2, 16), (32, 8, 2, 8)];

/// Most f32 registers a softmax tile may hold per thread (accumulators plus scores).
const SOFTMAX_REGISTER_BUDGET: u32 = 96;

fn softmax_candidates(block_q: u32, block_k: u32, head_dim: u32, limits: &wgpu::Limits) -> Vec<FusedTile> {
    SOFTMAX_CANDIDATES
        .iter()
        .filter_map(|&(wg, tq, rq, kc)| {
            if wg > limits.max_compute_invocations_per_workgroup || wg > limits.max_compute_workgroup_size_x {
                return None;
            }
            if tq > block_q || kc > block_k || tq % rq != 0 || wg % (tq / rq) != 0 {
                return None;
            }
            let dp = head_dim.next_multiple_of(4);
            let tile = FusedTile { tq, kc, wg, dp, cap: 0, rq };
            let lanes = tile.lanes();
            if kc % lanes != 0 {
                return None;
            }
            let registers = rq * (dp / 4).div_ceil(lanes) * 4 + rq * (kc / lanes);
            if registers > SOFTMAX_REGISTER_BUDGET {
                return None;
            }
            (tile.workgroup_bytes(false) <= limits.max_compute_workgroup_storage_size).then_some(tile)
        })
        .collect()
}

/// Tiles that fit this adapter for (block_q, block_k, head_dim), best guess first.
pub fn candidates(block_q: u32, block_k: u32, head_dim: u32, entmax: bool, limits: &wgpu::Limits) -> Vec<FusedTile> {
    if !entmax {
        return softmax_candidates(block_q, block_k, head_dim, limits);
    }
    CANDIDATES
        .iter()
        .filter_map(|&(wg, tq, kc)| {
            if wg > limits.max_compute_invocations_per_workgroup || wg > limits.max_compute_workgroup_size_x {
                return None;
            }
            if tq > block_q || kc > block_k {
                return None;
            }
            let tpr = wg / tq;
            let dp = head_dim.next_multiple_of(tpr.max(4));
            // Keep per-thread accumulators within a register budget.
            if dp / tpr > 32 {
                return None;
            }
            let tile = FusedTile { tq, kc, wg, dp, cap: ENTMAX_CANDIDATES_PER_THREAD * tpr, rq: 0 };
            (tile.workgroup_bytes(entmax) <= limits.max_compute_workgroup_storage_size).then_some(tile)
        })
        .collect()
}

/// The tile used without tuning: the first candidate, or a typed error naming the limit.
pub fn default_tile(block_q: u32, block_k: u32, head_dim: u32, entmax: bool, limits: &wgpu::Limits) -> Result<FusedTile> {
    if head_dim > MAX_FUSED_HEAD_DIM {
        return Err(Error::Unsupported(format!("fused kernels support head_dim <= {MAX_FUSED_HEAD_DIM}, got {head_dim}")));
    }
    candidates(block_q, block_k, head_dim, entmax, limits).into_iter().next().ok_or_else(|| {
        Error::Unsupported(format!(
            "no fused tile for head_dim {head_dim} fits max_compute_workgroup_storage_size = {} bytes (smallest needs {})",
            limits.max_compute_workgroup_storage_size,
            if entmax {
                FusedTile { tq: 4, kc: 8, wg: 64, dp: head_dim.next_multiple_of(16), cap: ENTMAX_CANDIDATES_PER_THREAD * 16, rq: 0 }
            } else {
                FusedTile { tq: 8, kc: 8, wg: 32, dp: head_dim.next_multiple_of(4), cap: 0, rq: 2 }
            }
            .workgroup_bytes(entmax)
        ))
    })
}

/// What a tuned choice is keyed by: the adapter and a shape bucket.
#[derive(Clone, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct TuneKey {
    pub adapter: String,
    pub entmax: bool,
    pub f16: bool,
    pub block_q: u32,
    pub block_k: u32,
    pub head_dim: u32,
    /// Sequence length rounded up to a power of two, clamped to [256, 8192].
    pub seq_bucket: u32,
}

impl TuneKey {
    pub fn seq_bucket(seq: usize) -> u32 {
        (seq.next_power_of_two() as u32).clamp(256, 8192)
    }
    fn file_key(&self) -> String {
        format!(
            "{}|{}|{}|{}x{}|d{}|n{}",
            self.adapter,
            if self.entmax { "entmax" } else { "softmax" },
            if self.f16 { "f16" } else { "f32" },
            self.block_q,
            self.block_k,
            self.head_dim,
            self.seq_bucket
        )
    }
}

/// Tuned tiles in memory, mirrored to a JSON file when `SPARSE_ATTN_TUNE_CACHE` names one.
#[derive(Debug, Default)]
pub struct TileCache {
    map: Mutex<HashMap<TuneKey, FusedTile>>,
}

/// Env variable naming the on-disk tile cache (JSON).
pub const ENV_TUNE_CACHE: &str = "SPARSE_ATTN_TUNE_CACHE";

impl TileCache {
    pub fn get(&self, key: &TuneKey) -> Option<FusedTile> {
        if let Some(t) = self.map.lock().ok().and_then(|m| m.get(key).copied()) {
            return Some(t);
        }
        let path = std::env::var(ENV_TUNE_CACHE).ok()?;
        let text = std::fs::read_to_string(path).ok()?;
        let disk: HashMap<String, FusedTile> = serde_json::from_str(&text).ok()?;
        let t = disk.get(&key.file_key()).copied()?;
        if let Ok(mut m) = self.map.lock() {
            m.insert(key.clone(), t);
        }
        Some(t)
    }

    pub fn insert(&self, key: TuneKey, tile: FusedTile) {
        if let Ok(path) = std::env::var(ENV_TUNE_CACHE) {
            let mut disk: HashMap<String, FusedTile> =
                std::fs::read_to_string(&path).ok().and_then(|t| serde_json::from_str(&t).ok()).unwrap_or_default();
            disk.insert(key.file_key(), tile);
            if let Ok(text) = serde_json::to_string_pretty(&disk) {
                if let Err(e) = std::fs::write(&path, text) {
                    tracing::warn!("cannot write tile cache {path}: {e}");
                }
            }
        }
        if let Ok(mut m) = self.map.lock() {
            m.insert(key, tile);
        }
    }

    pub fn len(&self) -> usize {
        self.map.lock().map(|m| m.len()).unwrap_or(0)
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}
