//! Fused-kernel tiles: the candidate set, the workgroup-memory model that filters it per
//! adapter, and the cache of tuned choices (in memory, optionally on disk).

use crate::error::{Error, Result};
use crate::pattern::BlockPattern;
use std::collections::HashMap;
use std::sync::Mutex;

/// One fused-kernel tile of the register-tiled layout (shaders/fused_tiles.wgsl): `tq` query
/// rows per workgroup, `kc` keys staged per step, `wg` threads, `dp` head_dim padded, `rq`
/// query rows per thread, and for the entmax kernels either `cap` pooled candidates per row
/// (fused_entmax.wgsl) or `rc` cached scores per row (fused_entmax_cached.wgsl, for rows of at
/// most `rc` keys); both 0 for softmax.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub struct FusedTile {
    pub tq: u32,
    pub kc: u32,
    pub wg: u32,
    pub dp: u32,
    pub cap: u32,
    #[serde(default)]
    pub rq: u32,
    #[serde(default)]
    pub rc: u32,
}

impl FusedTile {
    /// Lanes per row group (`wg / (tq / rq)`).
    pub fn lanes(&self) -> u32 {
        self.wg / (self.tq / self.rq.max(1)).max(1)
    }

    /// Threads per query row in the entmax kernel's per-score work (`wg / tq`).
    pub fn threads_per_row(&self) -> u32 {
        self.wg / self.tq.max(1)
    }

    /// Entmax pool slots per (row, lane); 0 for softmax.
    pub fn pool_per_lane(&self) -> u32 {
        self.cap / self.threads_per_row().max(1)
    }

    /// Trip counts of the kernels' `@unroll` loops (src/gpu/unroll.rs): rows per thread, keys
    /// per thread and chunk, vec4 output columns per thread.
    pub fn unroll_counts(&self) -> [(&'static str, u32); 3] {
        let lanes = self.lanes().max(1);
        [("RQ", self.rq.max(1)), ("NK", self.kc / lanes), ("NC", (self.dp / 4).div_ceil(lanes))]
    }

    /// Support-list slots per (row, lane) of the score-caching kernel (`SUPPORT_SLOTS` in
    /// fused_entmax_cached.wgsl; 0 for other tiles): at most an eighth of a lane's share of the
    /// cache (small supports, where reading only their V rows beats staging every chunk), as
    /// many as fit in `kv_tile` after the row reductions' scratch, and even, so each list
    /// starts on a vec4 of its own (WGSL lets a write to one component of a vector write all of
    /// it, and two threads' pairs in one vec4 would race). A tile gathers p·V only when every
    /// (row, lane)'s support fits.
    pub fn support_slots(&self) -> u32 {
        if self.rc == 0 || self.wg == 0 {
            return 0;
        }
        let room = (self.kv_tile_len().saturating_sub(self.wg) * 2) / self.wg;
        room.min((self.rc / (8 * self.threads_per_row().max(1))).max(2)) & !1
    }

    /// What stops this tile's layout from covering blocks of `block_q` × `block_k` keys at
    /// `head_dim` (None: nothing); the adapter's limits are checked separately. Every query
    /// row and key of a block must belong to exactly one thread's share, else rows or keys
    /// would be skipped silently.
    pub fn layout_problem(&self, block_q: u32, block_k: u32, head_dim: u32) -> Option<String> {
        let problem = if self.tq == 0 || self.kc == 0 || self.wg == 0 || self.rq == 0 {
            "tq, kc, wg and rq must be at least 1".to_string()
        } else if self.tq > block_q || !block_q.is_multiple_of(self.tq) || self.kc > block_k || !block_k.is_multiple_of(self.kc) {
            format!("tq must divide block_q = {block_q} and kc must divide block_k = {block_k}")
        } else if !self.tq.is_multiple_of(self.rq) || !self.wg.is_multiple_of(self.tq / self.rq) || !self.kc.is_multiple_of(self.lanes()) {
            "rq must divide tq, the row groups (tq / rq) must divide wg, and their lanes must divide kc".to_string()
        } else if self.dp != head_dim.next_multiple_of(4) {
            format!("dp must be head_dim = {head_dim} rounded up to a multiple of 4")
        } else if self.cap > 0 && self.rc > 0 {
            "cap (pooling entmax) and rc (score-caching entmax) exclude each other".to_string()
        } else if self.cap > 0 && self.wg.is_multiple_of(self.tq) && !self.cap.is_multiple_of(2 * self.threads_per_row()) {
            // Two (score, key) pairs share a vec4, and a write to one component may write the
            // whole vector: each lane's pool must start on a vec4 of its own.
            "cap must be a multiple of 2 · (wg / tq): an even pool per lane".to_string()
        } else if self.is_entmax() && (!self.wg.is_multiple_of(self.tq) || !self.kc.is_multiple_of(self.threads_per_row()) || self.tq * self.lanes() < self.wg) {
            "the entmax kernels need whole keys per thread: tq must divide wg, wg / tq must divide kc, and tq · lanes >= wg".to_string()
        } else {
            return None;
        };
        Some(problem)
    }

    /// Whether this is a tile of an entmax kernel (pooling or score-caching).
    pub fn is_entmax(&self) -> bool {
        self.cap > 0 || self.rc > 0
    }

    /// Padded row stride of `p_tile`: one chunk of scores, or the score cache.
    pub fn p_stride(&self) -> u32 {
        self.kc.max(self.rc) + 1
    }

    /// Vec4s of `kv_tile` the K side needs: the padded K chunk, and for entmax also the row
    /// reductions (two vec4s per thread: the τ search alternates halves).
    pub fn k_tile_len(&self) -> u32 {
        let k = self.kc * (self.dp / 4 + 1);
        if self.is_entmax() {
            k.max(2 * self.wg)
        } else {
            k
        }
    }

    /// Vec4s the V side needs: the V chunk, and for the pooling kernel also the candidate pool
    /// (one (score, key) pair per vec2).
    pub fn v_tile_len(&self) -> u32 {
        (self.kc * (self.dp / 4)).max((self.tq * self.cap).div_ceil(2))
    }

    /// Where V starts in `kv_tile`: after K, or at 0 in the score-caching kernel, which never
    /// holds K (pass 1) and V (pass 2) at once.
    pub fn v_offset(&self) -> u32 {
        if self.rc > 0 {
            0
        } else {
            self.k_tile_len()
        }
    }

    /// Length in vec4s of `kv_tile`.
    pub fn kv_tile_len(&self) -> u32 {
        self.k_tile_len().max(self.v_offset() + self.v_tile_len())
    }

    /// Workgroup memory in bytes (mirrors the arrays of shaders/fused_tiles.wgsl, the entmax
    /// kernels' vote word with the pool counts, or the chunk flags and support counts, and the
    /// subgroup-layout vote word of fused_lanes_*.wgsl).
    pub fn workgroup_bytes(&self) -> u32 {
        let dp4 = self.dp / 4;
        let vec4s = self.tq * (dp4 + 1) + self.kv_tile_len();
        let floats = self.tq * self.p_stride() + self.tq * self.lanes();
        let entmax_words = if self.cap > 0 {
            1 + self.wg
        } else if self.rc > 0 {
            1 + self.rc / self.kc.max(1) + self.wg
        } else {
            0
        };
        16 * vec4s + 4 * floats + 4 * (entmax_words + 1)
    }

    /// Lanes that share one row in the kernel's row reductions: the register tiles' row group
    /// (`lanes()`) for softmax, the per-score work's threads per row for entmax.
    pub fn reduction_lanes(&self) -> u32 {
        if self.is_entmax() {
            self.threads_per_row()
        } else {
            self.lanes()
        }
    }

    /// Whether the kernel may reduce across a row's lanes with subgroup shuffles on an adapter
    /// whose subgroups have at least `subgroup_min_size` invocations: the lanes (a power of
    /// two) must fit in the smallest subgroup. The kernel still checks the invocation layout at
    /// run time and otherwise reduces in workgroup memory.
    pub fn row_lanes_fit_subgroups(&self, subgroup_min_size: u32) -> bool {
        let lanes = self.reduction_lanes();
        lanes.is_power_of_two() && lanes <= subgroup_min_size
    }
}

/// Largest head_dim a fused tile supports.
pub const MAX_FUSED_HEAD_DIM: u32 = 256;
/// Longest key sequence of the fused entmax kernel: its pool keeps key indices as f32, exact
/// below 2^24 (longer rows take the three-kernel path under `ExecPath::Auto`).
pub const MAX_FUSED_ENTMAX_SEQ_KV: usize = 1 << 24;

/// Entmax pool slots per (row, lane): a tile takes the most that fit its adapter's workgroup
/// memory, in steps of `ENTMAX_POOL_STEP` up to `ENTMAX_POOL_MAX`. A row whose support does not
/// fit its lanes' pools takes the collect walk; one whose support exceeds the whole row's pool
/// makes its workgroup take the recompute fallback.
pub const ENTMAX_POOL_MAX: u32 = 64;
pub const ENTMAX_POOL_STEP: u32 = 4;

/// The softmax kernel's candidate set, best guess first: (threads, query rows, rows per thread,
/// keys per step). Larger register tiles feed more multiply-adds per workgroup-memory read;
/// 32-thread workgroups with 4 rows per thread suit adapters where barriers are dear
/// (llvmpipe: ~15 % faster than 64 threads there); the last ones fit block 16, large
/// head_dim and small workgroup memory.
const SOFTMAX_CANDIDATES: [(u32, u32, u32, u32); 10] =
    [(128, 32, 4, 32), (128, 16, 2, 32), (128, 64, 8, 64), (256, 64, 4, 64), (64, 32, 4, 32), (32, 32, 4, 32), (256, 32, 2, 32), (64, 16, 2, 16), (64, 8, 2, 16), (32, 8, 2, 8)];

/// The entmax kernel's candidate set, same layout (its per-score work runs `wg / tq` threads
/// per row, each with its own pool), best guess first: the first keeps 32 slots per lane in
/// 32 KiB at head_dim 64, which flat rows (large supports) need; the second has more rows per
/// thread and fewer slots; (32, 16, 4, 32) keeps the first one's pool with 4 rows per thread in
/// one 32-thread workgroup (fewer barrier participants: 15–25 % faster on llvmpipe); the last
/// ones fit block 16 and head_dim up to 256.
const ENTMAX_CANDIDATES: [(u32, u32, u32, u32); 6] = [(64, 16, 2, 32), (64, 32, 4, 32), (32, 16, 4, 32), (128, 16, 2, 32), (64, 16, 2, 16), (32, 8, 2, 8)];

/// Most f32 registers a tile may hold per thread (accumulators plus scores).
const REGISTER_BUDGET: u32 = 96;

/// The register tile (threads, rows, rows per thread, keys per step) for this problem and
/// adapter, without its entmax pool; None when it cannot run here.
fn register_tile((wg, tq, rq, kc): (u32, u32, u32, u32), block_q: u32, block_k: u32, head_dim: u32, limits: &wgpu::Limits) -> Option<FusedTile> {
    if wg > limits.max_compute_invocations_per_workgroup || wg > limits.max_compute_workgroup_size_x {
        return None;
    }
    let dp = head_dim.next_multiple_of(4);
    let tile = FusedTile { tq, kc, wg, dp, cap: 0, rq, rc: 0 };
    if tile.layout_problem(block_q, block_k, head_dim).is_some() {
        return None;
    }
    let lanes = tile.lanes();
    let registers = rq * (dp / 4).div_ceil(lanes) * 4 + rq * (kc / lanes);
    (registers <= REGISTER_BUDGET).then_some(tile)
}

/// The register tiles of an entmax candidate set that fit this problem and the entmax
/// kernels' per-score layout (whole keys per thread; `red` doubles as per-lane and per-row
/// scratch), before their pool or cache is sized.
fn entmax_register_tiles<'a>(
    set: &'a [(u32, u32, u32, u32)],
    block_q: u32,
    block_k: u32,
    head_dim: u32,
    limits: &'a wgpu::Limits,
) -> impl Iterator<Item = FusedTile> + 'a {
    set.iter()
        .filter_map(move |&c| register_tile(c, block_q, block_k, head_dim, limits))
        .filter(|t| t.kc % t.threads_per_row() == 0 && t.tq * t.lanes() >= t.wg)
}

/// Every tile a call may run, best guess first within each kernel: `candidates`, and for
/// entmax with `row_blocks` given (the longest row, in stored blocks) also the score-caching
/// tiles that hold such rows.
pub fn call_candidates(block_q: u32, block_k: u32, head_dim: u32, entmax: bool, row_blocks: Option<u32>, limits: &wgpu::Limits) -> Vec<FusedTile> {
    let mut tiles = candidates(block_q, block_k, head_dim, entmax, limits);
    if let (true, Some(rows)) = (entmax, row_blocks) {
        tiles.extend(cached_candidates(block_q, block_k, head_dim, rows, limits));
    }
    tiles
}

/// Tiles that fit this adapter for (block_q, block_k, head_dim), best guess first.
pub fn candidates(block_q: u32, block_k: u32, head_dim: u32, entmax: bool, limits: &wgpu::Limits) -> Vec<FusedTile> {
    let fits = |t: &FusedTile| t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size;
    if !entmax {
        return SOFTMAX_CANDIDATES.iter().filter_map(|&c| register_tile(c, block_q, block_k, head_dim, limits)).filter(fits).collect();
    }
    entmax_register_tiles(&ENTMAX_CANDIDATES, block_q, block_k, head_dim, limits)
        .filter_map(|t| {
            (1..=ENTMAX_POOL_MAX / ENTMAX_POOL_STEP).rev().map(|n| FusedTile { cap: n * ENTMAX_POOL_STEP * t.threads_per_row(), ..t }).find(fits)
        })
        .collect()
}

/// Longest score cache of the score-caching entmax kernel, in keys per row.
pub const ENTMAX_CACHE_MAX: u32 = 1024;

/// The score-caching entmax kernel's register tiles, same layout as the other sets, best guess
/// first. (32, 32, 4, 16) stages each K and V chunk once for 32 rows (the softmax's reuse) and
/// holds rows up to 144 keys in 32 KiB at head_dim 64 (272 in 48 KiB): on llvmpipe it beat
/// (32, 16, 4, 32) by 10–25 % on rows of 2–4 blocks; (32, 16, 4, 32) holds 288 keys there;
/// (128, 16, 2, 32) is the register tile the H200 chose for the softmax (untimed for this
/// kernel on a GPU; 2× slower on llvmpipe); the last ones fit block 16 and small workgroup
/// memory (and cache longer rows). (32, 8, 2, 32), with twice the cache, lost to the pooling
/// kernel on the rows only it could hold (llvmpipe, seq 1024 and 2048 at ρ 0.1), and
/// (64, 16, 2, 32) lost to (32, 16, 4, 32) everywhere on llvmpipe, so neither is a candidate.
const CACHED_CANDIDATES: [(u32, u32, u32, u32); 5] = [(32, 32, 4, 16), (32, 16, 4, 32), (128, 16, 2, 32), (64, 16, 2, 16), (32, 8, 2, 8)];

/// Keys per row the score-caching entmax kernel must cache for rows of `row_blocks` stored
/// blocks: each block is walked in whole chunks of `kc` keys.
pub fn cached_row_keys(row_blocks: u32, block_k: u32, kc: u32) -> u32 {
    row_blocks * block_k.div_ceil(kc.max(1)) * kc
}

/// Shortest score cache a tile is given, in keys per row: rows up to this long share one
/// pipeline per tile.
pub const ENTMAX_CACHE_MIN: u32 = 128;

/// Score-caching entmax tiles (fused_entmax_cached.wgsl) that fit this adapter and hold rows
/// of `row_blocks` stored blocks, best guess first; empty when none does (long rows take the
/// pooling kernel). A tile's cache is the row's keys rounded up to a power of two (at least
/// `ENTMAX_CACHE_MIN`), or the most keys its workgroup memory leaves room for (a multiple of
/// its chunk, at most `ENTMAX_CACHE_MAX`) when that is less: a few pipelines per tile serve
/// every row length, and short rows leave the rest of the workgroup memory to other
/// workgroups (occupancy on a GPU) instead of reserving the whole cache.
pub fn cached_candidates(block_q: u32, block_k: u32, head_dim: u32, row_blocks: u32, limits: &wgpu::Limits) -> Vec<FusedTile> {
    entmax_register_tiles(&CACHED_CANDIDATES, block_q, block_k, head_dim, limits)
        .filter_map(|t| {
            let capacity = (1..=ENTMAX_CACHE_MAX / t.kc)
                .rev()
                .map(|n| FusedTile { rc: n * t.kc, ..t })
                .find(|c| c.workgroup_bytes() <= limits.max_compute_workgroup_storage_size)?;
            let need = cached_row_keys(row_blocks.max(1), block_k, t.kc);
            // Powers of two at least kc are multiples of it.
            let bucket = need.next_power_of_two().max(ENTMAX_CACHE_MIN).max(t.kc);
            (need <= capacity.rc).then(|| FusedTile { rc: bucket.min(capacity.rc), ..t })
        })
        .collect()
}

/// Score-cache bucket of rows of `blocks` stored blocks of `block_k` keys: their keys rounded
/// up to a power of two, at least `ENTMAX_CACHE_MIN`; `None` past `ENTMAX_CACHE_MAX`, which no
/// cache holds.
pub fn cache_bucket(blocks: u32, block_k: u32) -> Option<u32> {
    let keys = blocks as u64 * block_k as u64;
    (keys <= ENTMAX_CACHE_MAX as u64).then(|| (keys as u32).next_power_of_two().max(ENTMAX_CACHE_MIN))
}

/// The fused entmax path's row classes for `pattern`: the longest row (in stored blocks) of
/// each score-cache bucket present, increasing; rows longer than any cache form the last
/// class. Empty rows join the first.
pub fn row_class_bounds(pattern: &BlockPattern) -> Vec<u32> {
    let mut longest: std::collections::BTreeMap<u32, u32> = Default::default();
    for w in pattern.row_ptr().windows(2) {
        let blocks = w[1].saturating_sub(w[0]);
        let bucket = cache_bucket(blocks, pattern.block_k()).unwrap_or(u32::MAX);
        let l = longest.entry(bucket).or_insert(0);
        *l = (*l).max(blocks);
    }
    longest.into_values().collect()
}

/// Whether a caller's forced tile may run where `fitting` are the call's candidates: one of
/// them, or one of their score-caching tiles with a longer cache (a multiple of its chunk, at
/// most `ENTMAX_CACHE_MAX`) that still fits the adapter's workgroup memory.
pub fn accepts(fitting: &[FusedTile], t: &FusedTile, limits: &wgpu::Limits) -> bool {
    fitting.contains(t)
        || (t.rc > 0
            && t.rc.is_multiple_of(t.kc.max(1))
            && t.rc <= ENTMAX_CACHE_MAX
            && t.workgroup_bytes() <= limits.max_compute_workgroup_storage_size
            && fitting.iter().any(|f| f.rc > 0 && f.rc <= t.rc && FusedTile { rc: t.rc, ..*f } == *t))
}

/// The tile used without tuning: the first candidate, or a typed error naming the limit.
pub fn default_tile(block_q: u32, block_k: u32, head_dim: u32, entmax: bool, limits: &wgpu::Limits) -> Result<FusedTile> {
    if head_dim > MAX_FUSED_HEAD_DIM {
        return Err(Error::Unsupported(format!("fused kernels support head_dim <= {MAX_FUSED_HEAD_DIM}, got {head_dim}")));
    }
    candidates(block_q, block_k, head_dim, entmax, limits).into_iter().next().ok_or_else(|| {
        // The smallest tile of the sets (with the smallest entmax pool).
        let smallest = FusedTile { tq: 8, kc: 8, wg: 32, dp: head_dim.next_multiple_of(4), cap: 0, rq: 2, rc: 0 };
        let smallest = if entmax { FusedTile { cap: ENTMAX_POOL_STEP * smallest.threads_per_row(), ..smallest } } else { smallest };
        Error::Unsupported(format!(
            "no fused tile for head_dim {head_dim} and blocks {block_q}x{block_k} fits max_compute_workgroup_storage_size = {} bytes (smallest needs {})",
            limits.max_compute_workgroup_storage_size,
            smallest.workgroup_bytes()
        ))
    })
}

/// Shortest run the tuner times a candidate on: a shorter one is mostly launch latency and, on a
/// GPU, a device with idle cores.
pub const TUNE_MIN_RUN_MS: f64 = 2.0;
/// Most query rows (heads × tokens) of the tuner's stand-in.
pub const TUNE_MAX_ROWS: usize = 65_536;

/// Heads of the tuner's stand-in with `seq` tokens per head: from 2, multiplied by powers of
/// two while a run takes less than `TUNE_MIN_RUN_MS` (`time_ms(heads)`: one run's
/// milliseconds, None when it could not run), up to `TUNE_MAX_ROWS` rows. A CPU adapter is busy
/// with 2 heads and stays there; a large GPU needs thousands of workgroups before the tiles'
/// throughput, rather than their latency, decides.
pub fn stand_in_heads(seq: usize, mut time_ms: impl FnMut(usize) -> Option<f64>) -> usize {
    let most = (TUNE_MAX_ROWS / seq.max(1)).max(2);
    let mut ran = 2; // the largest size that ran (or the first, untried)
    let mut heads = 2;
    loop {
        let ms = match time_ms(heads).filter(|ms| ms.is_finite()) {
            Some(ms) => ms,
            // Too large for the adapter (or not runnable at all): the last size that ran.
            None => return ran,
        };
        ran = heads;
        if ms >= TUNE_MIN_RUN_MS || heads >= most {
            return heads;
        }
        // Straight to the size that should reach the target (time grows about linearly with
        // heads once the device is full, slower before), at least double.
        let factor = (TUNE_MIN_RUN_MS / ms.max(1e-3)).ceil() as usize;
        heads = (heads * factor.next_power_of_two().max(2)).min(most);
    }
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
    /// Entmax: the pattern's longest row in stored blocks when score-caching tiles fit it (the
    /// candidates then include them, and the stand-in has rows that long); 0 otherwise.
    #[serde(default)]
    pub row_blocks: u32,
}

impl TuneKey {
    pub fn seq_bucket(seq: usize) -> u32 {
        (seq.next_power_of_two() as u32).clamp(256, 8192)
    }
    fn file_key(&self) -> String {
        format!(
            "{}|{}|{}|{}x{}|d{}|n{}{}",
            self.adapter,
            if self.entmax { "entmax" } else { "softmax" },
            if self.f16 { "f16" } else { "f32" },
            self.block_q,
            self.block_k,
            self.head_dim,
            self.seq_bucket,
            if self.row_blocks > 0 { format!("|rows{}", self.row_blocks) } else { String::new() }
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
        let t = read_disk_cache(std::path::Path::new(&path)).ok()?.get(&key.file_key()).copied()?;
        self.remember(key.clone(), t);
        Some(t)
    }

    pub fn insert(&self, key: TuneKey, tile: FusedTile) {
        if let Ok(path) = std::env::var(ENV_TUNE_CACHE) {
            if let Err(e) = add_to_disk_cache(std::path::Path::new(&path), &key.file_key(), tile) {
                tracing::warn!("tile cache {path} not updated: {e}");
            }
        }
        self.remember(key, tile);
    }

    /// Keeps a choice in memory only (not a timed one: never written to the disk cache).
    pub fn remember(&self, key: TuneKey, tile: FusedTile) {
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

/// The tiles of an on-disk cache by file key; a missing file is an empty cache, one that is not a
/// tile cache (or cannot be read) an error naming why.
fn read_disk_cache(path: &std::path::Path) -> std::result::Result<HashMap<String, FusedTile>, String> {
    match std::fs::read_to_string(path) {
        Ok(text) => serde_json::from_str(&text).map_err(|e| format!("not a tile cache: {e}")),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(HashMap::new()),
        Err(e) => Err(format!("cannot read it: {e}")),
    }
}

/// Adds one choice to an on-disk cache: read, add, write a temporary file beside it and rename
/// it over the cache, so a reader (another process tuning at the same time) never sees half a
/// file. A file that is not a tile cache is left as it is (an error), not replaced by one
/// entry. Two processes adding at once may lose one's entry, which is only tuned again.
fn add_to_disk_cache(path: &std::path::Path, file_key: &str, tile: FusedTile) -> std::result::Result<(), String> {
    let mut disk = read_disk_cache(path)?;
    disk.insert(file_key.to_string(), tile);
    let text = serde_json::to_string_pretty(&disk).map_err(|e| e.to_string())?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(format!(".{}.tmp", std::process::id()));
    let tmp = std::path::PathBuf::from(tmp);
    std::fs::write(&tmp, text).and_then(|_| std::fs::rename(&tmp, path)).map_err(|e| {
        let _ = std::fs::remove_file(&tmp);
        format!("cannot write it: {e}")
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// llvmpipe's limits: 32 KiB of workgroup memory.
    fn limits() -> wgpu::Limits {
        wgpu::Limits { max_compute_workgroup_storage_size: 32 << 10, max_compute_invocations_per_workgroup: 256, max_compute_workgroup_size_x: 256, ..wgpu::Limits::default() }
    }

    #[test]
    fn disk_cache_adds_entries_atomically_and_leaves_foreign_files_alone() {
        let dir = std::env::temp_dir().join(format!("sparse-attn-disk-cache-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("tiles.json");
        let _ = std::fs::remove_file(&path);
        let a = FusedTile { tq: 16, kc: 32, wg: 32, dp: 64, cap: 128, rq: 4, rc: 0 };
        let b = FusedTile { tq: 32, kc: 32, wg: 32, dp: 64, cap: 0, rq: 4, rc: 0 };
        // A missing file is an empty cache; entries accumulate.
        assert_eq!(read_disk_cache(&path).unwrap().len(), 0);
        add_to_disk_cache(&path, "a", a).unwrap();
        add_to_disk_cache(&path, "b", b).unwrap();
        let disk = read_disk_cache(&path).unwrap();
        assert_eq!((disk.get("a"), disk.get("b"), disk.len()), (Some(&a), Some(&b), 2));
        // Only the cache is left in the directory (the temporary file was renamed over it).
        let names: Vec<_> = std::fs::read_dir(&dir).unwrap().map(|e| e.unwrap().file_name()).collect();
        assert_eq!(names, [std::ffi::OsString::from("tiles.json")]);
        // A file that is not a tile cache is an error and stays as it was.
        std::fs::write(&path, "not json").unwrap();
        let err = add_to_disk_cache(&path, "a", a).unwrap_err();
        assert!(err.contains("not a tile cache"), "{err}");
        assert_eq!(std::fs::read_to_string(&path).unwrap(), "not json");
        assert!(read_disk_cache(&path).is_err());
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn pools_must_start_every_lane_on_a_vec4_of_its_own() {
        // (32, 16, 4, 32): 2 lanes per row, so pools of 4n slots per row keep 2n per lane.
        let tile = FusedTile { tq: 16, kc: 32, wg: 32, dp: 64, cap: 128, rq: 4, rc: 0 };
        assert_eq!(tile.layout_problem(32, 32, 64), None);
        // 2 slots per lane is the smallest even pool; 3 per lane (cap 6) would let two lanes'
        // pairs share a vec4.
        assert_eq!(FusedTile { cap: 4, ..tile }.layout_problem(32, 32, 64), None);
        let odd = FusedTile { cap: 6, ..tile }.layout_problem(32, 32, 64);
        assert!(odd.as_deref().is_some_and(|p| p.contains("multiple of 2 · (wg / tq)")), "{odd:?}");
        // Every listed pool candidate meets it.
        let listed = candidates(32, 32, 64, true, &limits());
        assert!(listed.iter().any(|t| t.cap > 0), "{listed:?}");
        for t in listed {
            assert_eq!(t.layout_problem(32, 32, 64), None, "{t:?}");
        }
    }

    #[test]
    fn stand_in_grows_until_runs_are_long_enough_and_stops_at_the_row_cap() {
        // A CPU adapter: 2 heads already take long enough, and only one run is timed.
        let mut timed = Vec::new();
        assert_eq!(stand_in_heads(1024, |h| { timed.push(h); Some(80.0) }), 2);
        assert_eq!(timed, [2]);
        // A GPU whose time is flat until it fills (latency 0.05 ms), then linear at 0.1 ms per
        // head: 2 → 64 (the 40x shortfall rounded up to a power of two), capped at 64 heads of
        // 1024 rows.
        let gpu = |h: usize| Some(0.05f64.max(0.1 * h as f64 / 8.0));
        assert_eq!(stand_in_heads(1024, gpu), TUNE_MAX_ROWS / 1024);
        // Short rows leave room for more heads; growth stops at the first run that reaches
        // the target (latency 0.5 ms, then 0.05 ms per head): 2 → 8 → 32 → 64.
        let mut timed = Vec::new();
        let slow_start = |h: usize| Some(0.5f64.max(0.05 * h as f64));
        let heads = stand_in_heads(256, |h| { timed.push(h); slow_start(h) });
        assert_eq!(timed, [2, 8, 32, 64]);
        assert_eq!(heads, 64);
        assert!(heads < TUNE_MAX_ROWS / 256);
        // A size that cannot run (or a broken timer) stops the growth at the last size that ran.
        let mut timed = Vec::new();
        assert_eq!(stand_in_heads(512, |h| { timed.push(h); (h < 8).then_some(0.01) }), 2);
        assert_eq!(timed, [2, 128]);
        assert_eq!(stand_in_heads(512, |_| Some(f64::NAN)), 2);
        // Rows longer than the cap still get 2 heads.
        assert_eq!(stand_in_heads(TUNE_MAX_ROWS * 2, |_| Some(0.01)), 2);
    }

    fn fast_cache_tile(row_blocks: u32) -> Option<FusedTile> {
        cached_candidates(32, 32, 64, row_blocks, &limits()).into_iter().find(|t| (t.wg, t.tq, t.rq, t.kc) == (32, 16, 4, 32))
    }

    #[test]
    fn score_caches_round_rows_up_to_a_power_of_two_within_the_tiles_capacity() {
        // (32, 16, 4, 32) at head_dim 64 holds 288 keys per row in 32 KiB (K and V share one
        // staging area).
        let rcs: Vec<Option<u32>> = [1, 4, 5, 8, 9, 10].into_iter().map(|b| fast_cache_tile(b).map(|t| t.rc)).collect();
        assert_eq!(rcs, [Some(128), Some(128), Some(256), Some(256), Some(288), None]);
        // (32, 32, 4, 16) holds 144 keys: rows of up to 4 blocks, in one 128-key bucket.
        let wide: Vec<Option<u32>> = [1, 4, 5]
            .into_iter()
            .map(|b| cached_candidates(32, 32, 64, b, &limits()).into_iter().find(|t| (t.wg, t.tq, t.rq, t.kc) == (32, 32, 4, 16)).map(|t| t.rc))
            .collect();
        assert_eq!(wide, [Some(128), Some(128), None]);
        for blocks in 1..=(ENTMAX_CACHE_MAX / 32) {
            for t in cached_candidates(32, 32, 64, blocks, &limits()) {
                assert!(t.rc >= blocks * 32 && t.rc % t.kc == 0 && t.rc <= ENTMAX_CACHE_MAX, "{blocks} blocks: {t:?}");
                assert!(t.workgroup_bytes() <= 32 << 10, "{t:?}");
            }
        }
    }

    #[test]
    fn a_forced_score_cache_may_be_longer_than_its_bucket_but_must_fit() {
        let l = limits();
        let fitting = call_candidates(32, 32, 64, true, Some(1), &l);
        let Some(short) = fast_cache_tile(1) else { panic!("no fast cache tile") };
        assert!(accepts(&fitting, &short, &l));
        assert!(accepts(&fitting, &FusedTile { rc: 288, ..short }, &l));
        assert!(!accepts(&fitting, &FusedTile { rc: 320, ..short }, &l), "320 keys exceed 32 KiB");
        assert!(!accepts(&fitting, &FusedTile { rc: 200, ..short }, &l), "not a multiple of the chunk");
        assert!(!accepts(&fitting, &FusedTile { rc: 288, tq: 32, ..short }, &l), "not a candidate's register tile");
        let pool = fitting.iter().copied().find(|t| t.cap > 0).unwrap_or_else(|| panic!("no pool tile"));
        assert!(!accepts(&fitting, &FusedTile { cap: pool.cap + 4, ..pool }, &l), "pool tiles are taken only as listed");
    }
}
