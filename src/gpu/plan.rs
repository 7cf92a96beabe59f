//! Planning: pure (no device). Validates a problem against the adapter's limits, picks tile
//! parameters and splits the work into chunks whose bindings and dispatches fit the limits.

use crate::error::{Error, Result};
use crate::pattern::BlockPattern;
use crate::{AttentionShape, Normalizer};

/// Storage element type of Q, K, V and O (accumulation is always f32).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum DType {
    F32,
    F16,
}

impl DType {
    pub fn bytes(self) -> u64 {
        match self {
            DType::F32 => 4,
            DType::F16 => 2,
        }
    }
    pub fn label(self) -> &'static str {
        match self {
            DType::F32 => "f32",
            DType::F16 => "f16",
        }
    }
}

/// Which kernels run a call.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Hash, serde::Serialize, serde::Deserialize)]
pub enum ExecPath {
    /// The fused kernel unless the caller asks for probabilities (then three-kernel).
    #[default]
    Auto,
    /// One fused kernel per query tile (online softmax; two-pass entmax). No scores buffer.
    Fused,
    /// SDDMM → normalise → SpMM through a scores buffer; can return the probabilities.
    ThreeKernel,
}

impl ExecPath {
    pub fn label(self) -> &'static str {
        match self {
            ExecPath::Auto => "auto",
            ExecPath::Fused => "fused",
            ExecPath::ThreeKernel => "three-kernel",
        }
    }
}

/// The device limits the planner obeys. `Engine` fills these from the device; tests may lower
/// them to force chunking.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlanLimits {
    /// `max_storage_buffer_binding_size`.
    pub max_binding_bytes: u64,
    /// `max_compute_workgroups_per_dimension`.
    pub max_workgroups_per_dim: u32,
    /// `min_storage_buffer_offset_alignment`.
    pub binding_alignment: u64,
    /// `max_buffer_size`.
    pub max_buffer_bytes: u64,
}

impl PlanLimits {
    pub fn from_wgpu(l: &wgpu::Limits) -> Self {
        Self {
            max_binding_bytes: l.max_storage_buffer_binding_size,
            max_workgroups_per_dim: l.max_compute_workgroups_per_dimension,
            binding_alignment: l.min_storage_buffer_offset_alignment as u64,
            max_buffer_bytes: l.max_buffer_size,
        }
    }
}

/// A byte window of a buffer bound for one chunk; `base` is the global element index of its
/// first element (what the shader subtracts).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Window {
    pub offset: u64,
    pub size: u64,
    pub base: u32,
}

impl Window {
    /// Window covering global elements `[lo, hi)` of `elem` bytes each, aligned down to `align`.
    fn covering(lo: u64, hi: u64, elem: u64, align: u64) -> Self {
        let offset = (lo * elem) / align * align;
        let size = (hi.max(lo + 1) * elem - offset).div_ceil(4) * 4;
        Window { offset, size, base: (offset / elem) as u32 }
    }
}

/// The uniform block every kernel reads (mirrors `Params` in shaders/common.wgsl).
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, bytemuck::Pod, bytemuck::Zeroable)]
pub struct Params {
    pub seq_q: u32,
    pub seq_kv: u32,
    pub head_dim: u32,
    pub heads: u32,
    pub kv_heads: u32,
    pub q_blocks: u32,
    pub k_blocks: u32,
    pub shared_pattern: u32,
    pub nnz_per_slice: u32,
    pub row_base: u32,
    pub row_count: u32,
    pub tile_base: u32,
    pub tile_count: u32,
    pub q_base: u32,
    pub kv_base: u32,
    pub o_base: u32,
    pub scores_base: u32,
    pub stats_base: u32,
    pub off_row_ptr: u32,
    pub off_col_idx: u32,
    pub off_mask_of: u32,
    pub off_blk_row: u32,
    pub off_masks: u32,
    pub d_chunks: u32,
    pub scale: f32,
    pub alpha: f32,
    pub exponent: f32,
    pub tolerance: f32,
    pub max_iterations: u32,
    /// Fused softmax: key splits per query tile (1 = the tile walks its whole row).
    pub key_splits: u32,
    /// Fused entmax row class of this dispatch: its workgroups skip query-block rows with
    /// fewer or more stored blocks than these (0 and u32::MAX: every row).
    pub min_row_blocks: u32,
    pub max_row_blocks: u32,
}

/// Offsets (in u32 words) of the pattern arrays packed into one storage buffer:
/// `[row_ptr | col_idx | mask_of | blk_row | masks]`, and a hash of the pattern's contents, so
/// an encode can tell that the uploaded pattern is the one its plan was made for (a pattern of
/// the same size but other blocks would walk keys outside the plan's K/V windows).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PackedPatternLayout {
    pub row_ptr: u32,
    pub col_idx: u32,
    pub mask_of: u32,
    pub blk_row: u32,
    pub masks: u32,
    pub words: u32,
    pub contents: u64,
}

impl PackedPatternLayout {
    pub fn of(p: &BlockPattern) -> Self {
        let row_ptr = 0u32;
        let col_idx = p.row_ptr().len() as u32;
        let mask_of = col_idx + p.nnz() as u32;
        let blk_row = mask_of + p.nnz() as u32;
        let masks = blk_row + p.nnz() as u32;
        // At least one word so the binding is never empty.
        let words = masks + (p.masks().len() as u32).max(1);
        Self { row_ptr, col_idx, mask_of, blk_row, masks, words, contents: contents_hash(p) }
    }

    /// Words that pattern slice `slice` of `p` brings into this layout: its row_ptr entries,
    /// a col_idx, mask_of and blk_row word per stored block, and at most a mask per partial
    /// block. A cut of consecutive slices packs to their sum plus at most 2 (row_ptr's last
    /// entry, the at-least-one mask word): how buffer groups size a per-slice pattern's cuts.
    pub fn slice_words(p: &BlockPattern, slice: usize) -> u64 {
        let qb = p.q_blocks() as usize;
        let blocks = p.row_ptr()[slice * qb] as usize..p.row_ptr()[(slice + 1) * qb] as usize;
        let partial = p.mask_of()[blocks.clone()].iter().filter(|&&m| m != crate::pattern::FULL).count();
        (qb + 3 * blocks.len() + partial * p.geometry().mask_words()) as u64
    }
}

/// Hash of everything that decides which pairs a pattern allows (in-process comparisons only).
fn contents_hash(p: &BlockPattern) -> u64 {
    use std::hash::{Hash, Hasher};
    let mut h = std::collections::hash_map::DefaultHasher::new();
    let g = p.geometry();
    (g.block_q, g.block_k, g.seq_q, g.seq_kv, g.slices).hash(&mut h);
    (p.row_ptr(), p.col_idx(), p.mask_of(), p.masks()).hash(&mut h);
    h.finish()
}

/// Packs a pattern for upload in `layout`, which must be `PackedPatternLayout::of(p)` (passed
/// in so the caller that already holds it does not hash the pattern again).
pub fn pack_pattern(p: &BlockPattern, layout: &PackedPatternLayout) -> Vec<u32> {
    let mut words = Vec::with_capacity(layout.words as usize);
    words.extend_from_slice(p.row_ptr());
    words.extend_from_slice(p.col_idx());
    words.extend_from_slice(p.mask_of());
    for (row, w) in p.row_ptr().windows(2).enumerate() {
        words.extend(std::iter::repeat_n(row as u32, (w[1] - w[0]) as usize));
    }
    words.extend_from_slice(p.masks());
    words.resize(layout.words as usize, 0);
    words
}

/// Workgroups of a 1-D job laid out on a 2-D grid within the per-dimension limit.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Grid {
    pub x: u32,
    pub y: u32,
}

impl Grid {
    fn for_count(count: u64, max_dim: u32) -> Option<Self> {
        if count == 0 {
            return Some(Grid { x: 0, y: 0 });
        }
        let x = count.min(max_dim as u64);
        let y = count.div_ceil(x);
        (y <= max_dim as u64).then_some(Grid { x: x as u32, y: y as u32 })
    }
    pub fn is_empty(&self) -> bool {
        self.x == 0
    }
}

/// One dispatch of the fused path: `tile` runs the query-block rows with at most `max_blocks`
/// stored blocks that no earlier class of the plan took (classes are ordered by
/// `max_blocks`). Entmax rows of different lengths thus run in one call on the tiles that suit
/// them: short rows on a score cache sized for them, longer ones on a longer cache or the
/// pooling kernel, instead of every row on the tile the longest one needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RowClass {
    pub max_blocks: u32,
    pub tile: super::tiles::FusedTile,
}

/// One dispatch chunk: a contiguous range of virtual rows (query blocks of slices).
#[derive(Clone, Debug, PartialEq)]
pub struct Chunk {
    pub rows: std::ops::Range<u32>,
    pub tiles: std::ops::Range<u32>,
    pub q: Window,
    pub kv: Window,
    pub o: Window,
    pub stats: Window,
    pub sddmm: Grid,
    pub normalize: Grid,
    pub spmm: Grid,
    /// Workgroups of the fused kernel per row class of the plan (TQ query rows and one key
    /// split each; a class's workgroups cover every row of the chunk and skip the others').
    pub fused: Vec<Grid>,
    /// Workgroups of the split merge (one per query row; empty without key splits).
    pub merge: Grid,
    pub params: Params,
}

/// What the three-kernel path will run: kernels' tile parameters and the chunks.
#[derive(Clone, Debug)]
pub struct Plan {
    /// `Fused` or `ThreeKernel` (never `Auto`).
    pub path: ExecPath,
    /// The fused kernels' tile when `path` is `Fused` (of the longest rows' class when the
    /// rows are split into classes).
    pub fused: Option<super::tiles::FusedTile>,
    /// The fused path's dispatches, shortest rows first; one class of every row unless the
    /// options split them. Empty on the three-kernel path.
    pub row_classes: Vec<RowClass>,
    pub shape: AttentionShape,
    pub dtype: DType,
    pub normalizer: Normalizer,
    pub block_q: u32,
    pub block_k: u32,
    /// Output columns per SpMM workgroup.
    pub d_chunk: u32,
    pub chunks: Vec<Chunk>,
    /// Bytes of the largest chunk's score tiles (the scratch buffer's size).
    pub scratch_bytes: u64,
    /// Fused softmax: key splits per query tile (1 = none).
    pub key_splits: u32,
    /// Bytes of the largest chunk's split partials (`key_splits > 1`), else 0.
    pub partial_bytes: u64,
    /// Total score tiles (for the optional probabilities output).
    pub total_tiles: u64,
    pub layout: PackedPatternLayout,
}

/// Settings that shape a plan.
#[derive(Clone, Debug)]
pub struct PlanOptions {
    pub normalizer: Normalizer,
    pub scale: f32,
    pub dtype: DType,
    /// Entmax stopping tolerance on |Σp − 1|.
    pub tolerance: f32,
    pub max_iterations: u32,
    /// `Some(tile)` plans the fused path with that tile; `None` the three-kernel path.
    pub fused: Option<super::tiles::FusedTile>,
    /// Fused entmax: rows split into classes, each on its own tile (shortest first; the last
    /// takes every row left, and its tile is `fused`'s). Empty: `fused` runs every row.
    pub row_classes: Vec<RowClass>,
    /// Fused softmax key splits: `None` chooses ([`auto_key_splits`]), `Some(n)` forces `n`
    /// (clamped to [1, MAX_KEY_SPLITS]; entmax and the three-kernel path never split).
    pub key_splits: Option<u32>,
}

/// Most key splits per query tile.
pub const MAX_KEY_SPLITS: u32 = 32;
/// Workgroups the fused softmax should have in flight before rows are split along keys.
pub const SPLIT_TARGET_WORKGROUPS: u64 = 1024;
/// Fewest stored blocks a key split walks.
pub const MIN_BLOCKS_PER_SPLIT: u64 = 8;

/// Key splits for `tiles` fused workgroups whose longest row has `max_row_blocks` blocks:
/// none while there are enough workgroups to fill a GPU; otherwise enough splits to reach the
/// target, each at least `MIN_BLOCKS_PER_SPLIT` blocks long (so long rows and few query tiles,
/// e.g. one head over 16k keys, still spread over the whole device).
pub fn auto_key_splits(tiles: u64, max_row_blocks: u64) -> u32 {
    if tiles == 0 || tiles >= SPLIT_TARGET_WORKGROUPS {
        return 1;
    }
    let by_target = SPLIT_TARGET_WORKGROUPS.div_ceil(tiles);
    let by_length = max_row_blocks / MIN_BLOCKS_PER_SPLIT;
    by_target.min(by_length).clamp(1, MAX_KEY_SPLITS as u64) as u32
}

/// Largest head_dim the kernels accept (SpMM splits columns, SDDMM loops over head_dim).
pub const MAX_HEAD_DIM: usize = 256;

/// Output columns per SpMM workgroup: a power of two in [16, 64].
pub fn d_chunk_for(head_dim: usize) -> u32 {
    (head_dim.next_power_of_two() as u32).clamp(16, 64)
}

/// Plans a call (fused when `opts.fused` is set, else three-kernel). Pure: reads only the
/// pattern's host arrays.
pub fn plan(
    shape: &AttentionShape,
    pattern: &BlockPattern,
    opts: &PlanOptions,
    limits: &PlanLimits,
) -> Result<Plan> {
    shape.validate()?;
    opts.normalizer.validate()?;
    pattern.check_fits(shape)?;
    if shape.head_dim > MAX_HEAD_DIM {
        return Err(Error::Unsupported(format!(
            "head_dim {} exceeds the largest supported head_dim {MAX_HEAD_DIM}",
            shape.head_dim
        )));
    }
    if !opts.scale.is_finite() {
        return Err(Error::NonFinite { tensor: "scale", index: 0, value: opts.scale });
    }
    check_entmax_stopping(opts.tolerance, opts.max_iterations)?;
    if limits.max_workgroups_per_dim == 0 || limits.max_binding_bytes < 16 || limits.max_buffer_bytes < 16 || !limits.binding_alignment.is_power_of_two() {
        return Err(Error::Unsupported(format!("plan limits cannot hold a call: {limits:?}")));
    }
    let (bq, bk) = (pattern.block_q(), pattern.block_k());
    let q_blocks = pattern.q_blocks();
    let slices = shape.slices() as u32;
    let rows_total = slices as u64 * q_blocks as u64;
    let shared = pattern.slices() == 1;
    let nnz_slice = if shared { pattern.nnz() as u32 } else { 0 };
    let total_tiles = if shared { pattern.nnz() as u64 * slices as u64 } else { pattern.nnz() as u64 };
    if total_tiles > u32::MAX as u64 || total_tiles * (bq * bk) as u64 > u32::MAX as u64 {
        return Err(Error::Unsupported(format!(
            "{total_tiles} score tiles of {bq}x{bk} exceed the kernels' u32 score indexing; use fewer slices per call"
        )));
    }
    let layout = PackedPatternLayout::of(pattern);
    let pattern_bytes = layout.words as u64 * 4;
    if pattern_bytes > limits.max_binding_bytes {
        return Err(Error::Limit {
            limit: "max_storage_buffer_binding_size (packed pattern)",
            required: pattern_bytes,
            available: limits.max_binding_bytes,
        });
    }
    let d = shape.head_dim as u64;
    let d_chunk = d_chunk_for(shape.head_dim);
    let d_chunks = (shape.head_dim as u32).div_ceil(d_chunk);
    let eb = opts.dtype.bytes();
    let tile_bytes = (bq * bk) as u64 * 4;
    // 16-byte aligned windows keep vec4 loads on vec4 boundaries.
    let limits = &PlanLimits { binding_alignment: limits.binding_alignment.max(16), ..*limits };
    let (seq_q, seq_kv) = (shape.seq_q as u64, shape.seq_kv as u64);
    let kv_slice = |s: u32| shape.kv_slice(s as usize) as u64;
    let row_classes = row_classes(pattern, opts)?;
    for class in &row_classes {
        if let Some(problem) = class.tile.layout_problem(bq, bk, shape.head_dim as u32) {
            return Err(Error::Unsupported(format!("fused tile {:?}: {problem}", class.tile)));
        }
        if class.tile.is_entmax() == (opts.normalizer == Normalizer::Softmax) {
            let kernel = if opts.normalizer == Normalizer::Softmax { "the softmax kernel's (cap = rc = 0)" } else { "an entmax kernel's (cap or rc > 0)" };
            return Err(Error::Unsupported(format!("fused tile {:?} is not {kernel}", class.tile)));
        }
    }
    for (i, class) in row_classes.iter().enumerate() {
        let t = class.tile;
        if t.rc == 0 {
            continue;
        }
        // The score-caching entmax kernel holds whole rows on chip; a longer row would lose keys.
        let longest = class.max_blocks.min(pattern.max_row_blocks());
        let need = super::tiles::cached_row_keys(longest, bk, t.kc);
        if need > t.rc {
            let whose = if row_classes.len() > 1 { format!("row class {i}'s longest row") } else { "the pattern's longest row".to_string() };
            return Err(Error::Unsupported(format!("score-caching entmax tile {t:?} caches {} keys per row; {whose} needs {need}", t.rc)));
        }
    }
    let fused_per_row: Vec<u64> = row_classes.iter().map(|c| (bq / c.tile.tq) as u64).collect();
    let key_splits = if opts.fused.is_some() && opts.normalizer == Normalizer::Softmax {
        match opts.key_splits {
            Some(n) => n.clamp(1, MAX_KEY_SPLITS),
            None => {
                let max_row_blocks = (0..pattern.slices() as usize)
                    .flat_map(|s| (0..q_blocks as usize).map(move |qb| (s, qb)))
                    .map(|(s, qb)| pattern.row_blocks(s, qb).len() as u64)
                    .max()
                    .unwrap_or(0);
                // Softmax plans have one row class.
                auto_key_splits(rows_total * fused_per_row.first().copied().unwrap_or(1), max_row_blocks)
            }
        }
    } else {
        1
    };
    // Split partials per query row and split: m, l and head_dim accumulators (f32).
    let partial_row_bytes = if key_splits > 1 { key_splits as u64 * (d + 2) * 4 } else { 0 };

    let row_info = |r: u64| {
        let s = (r / q_blocks as u64) as u32;
        let qb = (r % q_blocks as u64) as u32;
        let blocks = pattern.row_blocks(pattern.pattern_slice(s as usize), qb as usize);
        let tile0 = if shared { s as u64 * nnz_slice as u64 + blocks.start as u64 } else { blocks.start as u64 };
        let cols = (!blocks.is_empty()).then(|| (pattern.col_idx()[blocks.start], pattern.col_idx()[blocks.end - 1]));
        (s, qb, tile0, tile0 + blocks.len() as u64, cols)
    };

    struct Acc {
        r0: u64,
        s0: u32,
        qb0: u32,
        tile0: u64,
        tile1: u64,
        cmin: u32,
        cmax: u32,
    }
    let windows = |a: &Acc, r_last: u64| {
        let (s1, qb1, ..) = row_info(r_last);
        let q_lo = (a.s0 as u64 * seq_q + (a.qb0 * bq) as u64) * d;
        let q_hi = (s1 as u64 * seq_q + (((qb1 + 1) * bq) as u64).min(seq_q)) * d;
        let q = Window::covering(q_lo, q_hi, eb, limits.binding_alignment);
        let kv = if a.cmin <= a.cmax {
            let lo = (kv_slice(a.s0) * seq_kv + (a.cmin * bk) as u64) * d;
            let hi = (kv_slice(s1) * seq_kv + (((a.cmax + 1) * bk) as u64).min(seq_kv)) * d;
            Window::covering(lo, hi, eb, limits.binding_alignment)
        } else {
            // No blocks: a dummy window of one vec4 (the vec4 fused loads need 4 elements).
            Window::covering(0, 4, eb, limits.binding_alignment)
        };
        let stats_lo = 2 * a.r0 * bq as u64;
        let stats_hi = 2 * (r_last + 1) * bq as u64;
        let stats = Window::covering(stats_lo, stats_hi, 4, limits.binding_alignment);
        let scores = (a.tile1 - a.tile0).max(1) * tile_bytes;
        let rows = r_last + 1 - a.r0;
        let fused_grids: Option<Vec<Grid>> =
            fused_per_row.iter().map(|per_row| Grid::for_count(rows * per_row * key_splits as u64, limits.max_workgroups_per_dim)).collect();
        let grids = (
            Grid::for_count(a.tile1 - a.tile0, limits.max_workgroups_per_dim),
            Grid::for_count(rows * bq as u64, limits.max_workgroups_per_dim),
            Grid::for_count(rows * d_chunks as u64, limits.max_workgroups_per_dim),
            fused_grids,
            Grid::for_count(if key_splits > 1 { rows * bq as u64 } else { 0 }, limits.max_workgroups_per_dim),
        );
        let partial = rows * bq as u64 * partial_row_bytes;
        (q, kv, stats, scores.max(partial), grids)
    };
    let fused = opts.fused;
    // The fused path has no scores or stats buffers.
    let fits = |q: &Window, kv: &Window, stats: &Window, scores: u64| {
        // `scores` is the chunk's score tiles (three-kernel) or split partials (fused).
        let extra = if fused.is_some() { if key_splits > 1 { scores } else { 0 } } else { stats.size.max(scores) };
        // The scratch buffers are sized by the largest chunk: its scores must fit a buffer too.
        [q.size, kv.size].into_iter().all(|b| b <= limits.max_binding_bytes) && extra <= limits.max_binding_bytes.min(limits.max_buffer_bytes)
    };


    let mut chunks = Vec::new();
    let mut scratch_bytes = tile_bytes;
    let mut partial_bytes = 0u64;
    let mut r = 0u64;
    while r < rows_total {
        let (s0, qb0, t0, t1, cols) = row_info(r);
        let mut acc = Acc { r0: r, s0, qb0, tile0: t0, tile1: t1, cmin: u32::MAX, cmax: 0 };
        if let Some((a, b)) = cols {
            (acc.cmin, acc.cmax) = (a, b);
        }
        let (q, kv, stats, scores, (g1, g2, g3, g4, g5)) = windows(&acc, r);
        if !fits(&q, &kv, &stats, scores) || g1.is_none() || g2.is_none() || g3.is_none() || g4.is_none() || g5.is_none() {
            let required = [q.size, kv.size, stats.size, scores].into_iter().max().unwrap_or(0);
            return Err(Error::Limit {
                limit: if fused.is_some() {
                    "max_storage_buffer_binding_size (the K/V span of one query-block row)"
                } else {
                    "max_storage_buffer_binding_size (one query-block row of the three-kernel path; the fused path needs no scores buffer)"
                },
                required,
                available: limits.max_binding_bytes,
            });
        }
        let mut last = r;
        // Grow the chunk row by row while every binding and grid still fits.
        while last + 1 < rows_total {
            let (_, _, _, n_t1, n_cols) = row_info(last + 1);
            let mut trial = Acc { tile1: n_t1, ..acc };
            if let Some((a, b)) = n_cols {
                trial.cmin = trial.cmin.min(a);
                trial.cmax = trial.cmax.max(b);
            }
            let (q, kv, stats, scores, (g1, g2, g3, g4, g5)) = windows(&trial, last + 1);
            if !fits(&q, &kv, &stats, scores) || g1.is_none() || g2.is_none() || g3.is_none() || g4.is_none() || g5.is_none() {
                break;
            }
            acc = trial;
            last += 1;
        }
        let (q, kv, stats, scores, (g1, g2, g3, g4, g5)) = windows(&acc, last);
        let o = q;
        if fused.is_none() {
            scratch_bytes = scratch_bytes.max(scores);
        } else if key_splits > 1 {
            partial_bytes = partial_bytes.max(scores);
        }
        let params = Params {
            seq_q: seq_q as u32,
            seq_kv: seq_kv as u32,
            head_dim: d as u32,
            heads: shape.heads as u32,
            kv_heads: shape.kv_heads as u32,
            q_blocks,
            k_blocks: pattern.k_blocks(),
            shared_pattern: shared as u32,
            nnz_per_slice: nnz_slice.max(1),
            row_base: acc.r0 as u32,
            row_count: (last + 1 - acc.r0) as u32,
            tile_base: acc.tile0 as u32,
            tile_count: (acc.tile1 - acc.tile0) as u32,
            q_base: q.base,
            kv_base: kv.base,
            o_base: o.base,
            scores_base: (acc.tile0 * (bq * bk) as u64) as u32,
            stats_base: stats.base,
            off_row_ptr: layout.row_ptr,
            off_col_idx: layout.col_idx,
            off_mask_of: layout.mask_of,
            off_blk_row: layout.blk_row,
            off_masks: layout.masks,
            d_chunks,
            scale: opts.scale,
            alpha: opts.normalizer.alpha().unwrap_or(1.0) as f32,
            exponent: opts.normalizer.alpha().map_or(1.0, |a| 1.0 / (a - 1.0)) as f32,
            tolerance: opts.tolerance,
            max_iterations: opts.max_iterations,
            key_splits,
            min_row_blocks: 0,
            max_row_blocks: u32::MAX,
        };
        chunks.push(Chunk {
            rows: acc.r0 as u32..(last + 1) as u32,
            tiles: acc.tile0 as u32..acc.tile1 as u32,
            q,
            kv,
            o,
            stats,
            sddmm: g1.unwrap_or(Grid { x: 0, y: 0 }),
            normalize: g2.unwrap_or(Grid { x: 0, y: 0 }),
            spmm: g3.unwrap_or(Grid { x: 0, y: 0 }),
            fused: g4.unwrap_or_default(),
            merge: g5.unwrap_or(Grid { x: 0, y: 0 }),
            params,
        });
        r = last + 1;
    }
    // Whole tensors live in one buffer each (only their bindings are windowed per chunk).
    let q_bytes = shape.slices() as u64 * seq_q * d * eb;
    let kv_bytes = (shape.batch * shape.kv_heads) as u64 * seq_kv * d * eb;
    // The row stats scratch (support, iterations per padded query row) is one buffer too.
    let stats_bytes = 2 * rows_total * bq as u64 * 4;
    for (limit, required) in [
        ("max_buffer_size (Q and O tensors)", q_bytes),
        ("max_buffer_size (K and V tensors)", kv_bytes),
        ("max_buffer_size (packed pattern)", pattern_bytes),
        ("max_buffer_size (row stats)", stats_bytes),
    ] {
        if required > limits.max_buffer_bytes {
            return Err(Error::Limit { limit, required, available: limits.max_buffer_bytes });
        }
    }
    if scratch_bytes > limits.max_buffer_bytes {
        return Err(Error::Limit { limit: "max_buffer_size", required: scratch_bytes, available: limits.max_buffer_bytes });
    }
    if partial_bytes > limits.max_buffer_bytes {
        return Err(Error::Limit { limit: "max_buffer_size (key-split partials)", required: partial_bytes, available: limits.max_buffer_bytes });
    }
    Ok(Plan {
        path: if fused.is_some() { ExecPath::Fused } else { ExecPath::ThreeKernel },
        fused,
        row_classes,
        shape: *shape,
        dtype: opts.dtype,
        normalizer: opts.normalizer,
        block_q: bq,
        block_k: bk,
        d_chunk,
        chunks,
        scratch_bytes,
        key_splits,
        partial_bytes,
        total_tiles,
        layout,
    })
}

/// The entmax threshold search's stopping rule: a finite tolerance above 0 and at least one
/// iteration. Checked whatever the normaliser (the options always carry both), so a bad value
/// is reported where it is set, not when the same options later run entmax.
pub fn check_entmax_stopping(tolerance: f32, max_iterations: u32) -> Result<()> {
    if !tolerance.is_finite() || tolerance <= 0.0 || max_iterations == 0 {
        return Err(Error::Normalizer(format!("entmax tolerance must be finite and > 0 and max_iterations >= 1, got {tolerance} and {max_iterations}")));
    }
    Ok(())
}

/// The fused path's row classes for `opts` (validated), or none for the three-kernel path.
fn row_classes(pattern: &BlockPattern, opts: &PlanOptions) -> Result<Vec<RowClass>> {
    let Some(tile) = opts.fused else {
        if opts.row_classes.is_empty() {
            return Ok(Vec::new());
        }
        return Err(Error::Unsupported("row classes split the fused path's rows; the plan has no fused tile".into()));
    };
    let classes = &opts.row_classes;
    let Some(last) = classes.last() else {
        return Ok(vec![RowClass { max_blocks: u32::MAX, tile }]);
    };
    if opts.normalizer == Normalizer::Softmax {
        return Err(Error::Unsupported("row classes are for the fused entmax kernels; the softmax runs every row on one tile".into()));
    }
    if classes.windows(2).any(|w| w[0].max_blocks >= w[1].max_blocks) {
        return Err(Error::Unsupported(format!("row classes must grow in max_blocks: {classes:?}")));
    }
    if last.tile != tile || last.max_blocks < pattern.max_row_blocks() {
        return Err(Error::Unsupported(format!(
            "the last row class must run the plan's fused tile {tile:?} on the longest rows ({} blocks), got {last:?}",
            pattern.max_row_blocks()
        )));
    }
    Ok(classes.clone())
}

#[cfg(test)]
mod split_tests {
    use super::*;

    #[test]
    fn auto_key_splits_only_when_tiles_are_few_and_rows_long() {
        // Enough workgroups: never split.
        assert_eq!(auto_key_splits(SPLIT_TARGET_WORKGROUPS, 10_000), 1);
        // Few tiles but short rows: each split must keep MIN_BLOCKS_PER_SPLIT blocks.
        assert_eq!(auto_key_splits(8, MIN_BLOCKS_PER_SPLIT), 1);
        assert_eq!(auto_key_splits(8, 3 * MIN_BLOCKS_PER_SPLIT), 3);
        // Few tiles, long rows: enough splits to reach the target, capped.
        assert_eq!(auto_key_splits(512, 512), 2);
        assert_eq!(auto_key_splits(1, 100_000), MAX_KEY_SPLITS);
        assert_eq!(auto_key_splits(0, 100), 1);
    }
}

#[cfg(test)]
mod row_class_tests {
    use super::*;
    use crate::gpu::tiles::FusedTile;
    use crate::pattern::{BlockMask, PatternAccumulator, PatternGeometry};

    const LIMITS: PlanLimits = PlanLimits { max_binding_bytes: 1 << 30, max_workgroups_per_dim: 65535, binding_alignment: 256, max_buffer_bytes: 1 << 30 };
    const CACHE: FusedTile = FusedTile { tq: 32, kc: 16, wg: 32, dp: 64, cap: 0, rq: 4, rc: 128 };
    const POOL: FusedTile = FusedTile { tq: 16, kc: 32, wg: 32, dp: 64, cap: 128, rq: 4, rc: 0 };

    /// Query-block rows of 0, 2, 4, 9 and 40 stored blocks of 32 keys.
    fn pattern() -> (AttentionShape, BlockPattern) {
        let g = PatternGeometry { block_q: 32, block_k: 32, seq_q: 160, seq_kv: 40 * 32, slices: 1 };
        let mut acc = PatternAccumulator::new(g).unwrap_or_else(|e| panic!("{e}"));
        for blocks in [0u32, 2, 4, 9, 40] {
            acc.push_row((0..blocks).map(|b| (b, BlockMask::Full)));
        }
        let p = acc.finish().unwrap_or_else(|e| panic!("{e}"));
        (AttentionShape::new(1, 2, 160, 64).with_seq_kv(40 * 32), p)
    }

    fn opts(normalizer: Normalizer, row_classes: Vec<RowClass>) -> PlanOptions {
        PlanOptions { normalizer, scale: 0.125, dtype: DType::F32, tolerance: 1e-6, max_iterations: 50, fused: Some(POOL), row_classes, key_splits: None }
    }

    #[test]
    fn classes_are_the_longest_row_of_each_cache_bucket() {
        let (_, p) = pattern();
        assert_eq!(crate::gpu::tiles::row_class_bounds(&p), [4, 9, 40]);
        assert_eq!(crate::gpu::tiles::cache_bucket(0, 32), Some(128));
        assert_eq!(crate::gpu::tiles::cache_bucket(5, 32), Some(256));
        assert_eq!(crate::gpu::tiles::cache_bucket(32, 32), Some(1024));
        assert_eq!(crate::gpu::tiles::cache_bucket(33, 32), None);
    }

    #[test]
    fn each_class_gets_its_grid_and_bad_classes_are_refused() {
        let (shape, p) = pattern();
        let entmax = Normalizer::ENTMAX15;
        let classes = vec![RowClass { max_blocks: 4, tile: CACHE }, RowClass { max_blocks: 40, tile: POOL }];
        let classed = plan(&shape, &p, &opts(entmax, classes.clone()), &LIMITS).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(classed.row_classes, classes);
        assert_eq!(classed.fused, Some(POOL));
        for chunk in &classed.chunks {
            let rows = (chunk.rows.end - chunk.rows.start) as u64;
            // One query tile per 32-row block for the cache tile, two of 16 rows for the pools.
            let counts: Vec<u64> = chunk.fused.iter().map(|g| g.x as u64 * g.y as u64).collect();
            assert_eq!(counts, [rows, 2 * rows]);
        }
        // No classes: one class of every row.
        let single = plan(&shape, &p, &opts(entmax, Vec::new()), &LIMITS).unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(single.row_classes, [RowClass { max_blocks: u32::MAX, tile: POOL }]);
        let refused = |classes: Vec<RowClass>, normalizer: Normalizer, want: &str| match plan(&shape, &p, &opts(normalizer, classes), &LIMITS) {
            Err(Error::Unsupported(msg)) => assert!(msg.contains(want), "{msg}"),
            other => panic!("expected Unsupported({want}), got {other:?}"),
        };
        refused(classes.clone(), Normalizer::Softmax, "softmax");
        refused(vec![RowClass { max_blocks: 9, tile: CACHE }, RowClass { max_blocks: 4, tile: POOL }], entmax, "grow");
        refused(vec![RowClass { max_blocks: 4, tile: CACHE }, RowClass { max_blocks: 9, tile: POOL }], entmax, "longest rows");
        refused(vec![RowClass { max_blocks: 4, tile: POOL }, RowClass { max_blocks: 40, tile: CACHE }], entmax, "fused tile");
        // A 128-key cache cannot take the class of 9-block rows.
        refused(vec![RowClass { max_blocks: 9, tile: CACHE }, RowClass { max_blocks: 40, tile: POOL }], entmax, "row class 0");
        let three_kernel = PlanOptions { fused: None, ..opts(entmax, classes) };
        assert!(matches!(plan(&shape, &p, &three_kernel, &LIMITS), Err(Error::Unsupported(_))));
    }

    #[test]
    fn the_pure_plan_checks_tiles_stopping_rule_and_limits_itself() {
        // plan() is public: options and limits that did not come from an Engine are checked
        // here, not trusted (a zero would divide, a misfit tile would skip rows silently).
        let (shape, p) = pattern();
        let entmax = Normalizer::ENTMAX15;
        let with_tile = |tile: FusedTile, normalizer: Normalizer| plan(&shape, &p, &PlanOptions { fused: Some(tile), ..opts(normalizer, Vec::new()) }, &LIMITS);
        let unsupported = |r: Result<Plan>, want: &str| match r {
            Err(Error::Unsupported(msg)) => assert!(msg.contains(want), "{msg}"),
            other => panic!("expected Unsupported({want}), got {:?}", other.map(|p| p.fused)),
        };
        unsupported(with_tile(FusedTile { tq: 0, ..POOL }, entmax), "at least 1");
        unsupported(with_tile(FusedTile { tq: 24, wg: 48, ..POOL }, entmax), "tq must divide block_q");
        unsupported(with_tile(FusedTile { rq: 3, ..POOL }, entmax), "rq must divide tq");
        unsupported(with_tile(FusedTile { dp: 32, ..POOL }, entmax), "dp must be head_dim");
        unsupported(with_tile(FusedTile { rc: 128, ..POOL }, entmax), "exclude each other");
        unsupported(with_tile(POOL, Normalizer::Softmax), "not the softmax kernel's");
        unsupported(with_tile(FusedTile { cap: 0, ..POOL }, entmax), "not an entmax kernel's");
        assert!(with_tile(POOL, entmax).is_ok());
        for (tolerance, iterations) in [(f32::INFINITY, 50), (f32::NAN, 50), (0.0, 50), (1e-6, 0)] {
            let o = PlanOptions { tolerance, max_iterations: iterations, ..opts(entmax, Vec::new()) };
            assert!(matches!(plan(&shape, &p, &o, &LIMITS), Err(Error::Normalizer(_))), "tolerance {tolerance}, {iterations} iterations");
        }
        for limits in [PlanLimits { max_workgroups_per_dim: 0, ..LIMITS }, PlanLimits { binding_alignment: 0, ..LIMITS }, PlanLimits { max_binding_bytes: 0, ..LIMITS }] {
            unsupported(plan(&shape, &p, &opts(entmax, Vec::new()), &limits), "plan limits");
        }
        // Q (2 heads x 160 x 64 f32 = 80 KiB) cannot be one buffer of 64 KiB; K and V (1280 keys) neither at 200 KiB.
        for (max, which) in [(64 << 10, "Q and O"), (200 << 10, "K and V")] {
            match plan(&shape, &p, &opts(entmax, Vec::new()), &PlanLimits { max_buffer_bytes: max, ..LIMITS }) {
                Err(Error::Limit { limit, available, .. }) => assert!(limit.contains(which) && available == max, "{limit}"),
                other => panic!("expected the {which} buffer limit, got {:?}", other.map(|p| p.fused)),
            }
        }
        // A per-slice pattern's slices pack to the whole layout's words, less row_ptr's end.
        let per_slice = crate::patterns::RandomBlocks::new(0.6, 3).with_partial(0.5).per_slice(true).build(&AttentionShape::new(2, 3, 100, 16)).unwrap_or_else(|e| panic!("{e}"));
        let sum: u64 = (0..per_slice.slices() as usize).map(|s| PackedPatternLayout::slice_words(&per_slice, s)).sum();
        assert_eq!(sum + 1, PackedPatternLayout::of(&per_slice).words as u64);
        // At head_dim 1 the row stats scratch (8 bytes per padded query row: 2 x 640 x 8 =
        // 10 KiB) outgrows Q (2 x 640 x 4 = 5 KiB) and is checked as a buffer of its own (one
        // 32-key block per row: each row's 4 KiB of scores fit the 8 KiB buffers).
        let g = PatternGeometry { block_q: 32, block_k: 32, seq_q: 640, seq_kv: 32, slices: 1 };
        let mut acc = PatternAccumulator::new(g).unwrap_or_else(|e| panic!("{e}"));
        for _ in 0..20 {
            acc.push_row([(0u32, BlockMask::Full)]);
        }
        let narrow_pattern = acc.finish().unwrap_or_else(|e| panic!("{e}"));
        let narrow = AttentionShape::new(1, 2, 640, 1).with_seq_kv(32);
        let three_kernel = PlanOptions { fused: None, ..opts(entmax, Vec::new()) };
        match plan(&narrow, &narrow_pattern, &three_kernel, &PlanLimits { max_buffer_bytes: 8192, ..LIMITS }) {
            Err(Error::Limit { limit, required, .. }) => assert!(limit.contains("row stats") && required == 10240, "{limit}: {required}"),
            other => panic!("expected the row stats buffer limit, got {:?}", other.map(|p| p.fused)),
        }
    }
}
