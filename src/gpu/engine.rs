//! `Engine`: the entry type. Owns (or shares) a device, caches pipelines, and offers three
//! layers: `plan` (pure) → `encode` (records into the caller's encoder) → `attention` (uploads,
//! submits and reads back).

use super::device::{self, Capabilities};
use super::kernels::{Kernel, KernelCache, KernelKey, KernelKind};
use super::plan::{self, DType, ExecPath, Plan, PlanLimits, PlanOptions, RowClass, Window};
use super::tiles::{self, FusedTile, TileCache, TuneKey};
use crate::error::{Error, Result};
use crate::pattern::BlockPattern;
use crate::shape::validate_qkv;
use crate::{AttentionShape, Normalizer};
use ndarray::{Array2, Array3, Array4, ArrayView4};
use wgpu::util::DeviceExt;

/// Options of one attention call.
#[derive(Clone, Copy, Debug)]
pub struct AttentionOptions {
    pub normalizer: Normalizer,
    /// Score scale; `None` = `1/sqrt(head_dim)`.
    pub scale: Option<f32>,
    pub dtype: DType,
    /// Also return the normalised probabilities in the pattern's layout.
    pub return_probabilities: bool,
    /// Also return per-row support sizes and entmax iteration counts.
    pub return_row_stats: bool,
    /// Entmax: stop when |Σp − 1| falls below this.
    pub tolerance: f32,
    /// Entmax: iteration cap of the threshold search.
    pub max_iterations: u32,
    /// Kernel path; `Auto` picks fused unless probabilities are requested.
    pub path: ExecPath,
    /// Forces a fused tile (one of `gpu::tiles::call_candidates` for the problem and adapter);
    /// one that does not fit is `Unsupported` on `Fused` and `Auto` alike (the error lists the
    /// tiles that do). `None` uses the tuned or default tile.
    pub fused_tile: Option<FusedTile>,
    /// Fused softmax split-K: `None` splits rows along keys when there are too few query tiles
    /// to fill the GPU ([`plan::auto_key_splits`]); `Some(n)` forces `n` splits (1 = never).
    pub key_splits: Option<u32>,
}

impl Default for AttentionOptions {
    fn default() -> Self {
        Self {
            normalizer: Normalizer::Softmax,
            scale: None,
            dtype: DType::F32,
            return_probabilities: false,
            return_row_stats: false,
            tolerance: 1e-6,
            max_iterations: 50,
            path: ExecPath::Auto,
            fused_tile: None,
            key_splits: None,
        }
    }
}

impl AttentionOptions {
    pub fn new(normalizer: Normalizer) -> Self {
        Self { normalizer, ..Self::default() }
    }
}

/// Probabilities in the pattern's layout: tile `t` holds block `b` of slice `s` at
/// `t = s * nnz + b` (shared pattern) or `t = b` (per-slice pattern), each `block_q × block_k`.
#[derive(Clone, Debug)]
pub struct SparseProbabilities {
    pub block_q: u32,
    pub block_k: u32,
    pub tiles: Vec<f32>,
}

impl SparseProbabilities {
    /// Dense `[seq_q, seq_kv]` probabilities of problem slice `slice` (tests, small problems);
    /// `pattern` must be the one the call ran with (its blocks and tiles must match these).
    pub fn to_dense(&self, pattern: &BlockPattern, slice: usize) -> Result<Array2<f32>> {
        let (bq, bk) = (self.block_q as usize, self.block_k as usize);
        if (pattern.block_q(), pattern.block_k()) != (self.block_q, self.block_k) {
            return Err(Error::Shape(format!("probabilities of {bq}x{bk} blocks, pattern of {}x{}", pattern.block_q(), pattern.block_k())));
        }
        let ps = pattern.pattern_slice(slice);
        if ps >= pattern.slices() as usize {
            return Err(Error::Shape(format!("slice {slice} of a pattern with {} slices", pattern.slices())));
        }
        let tile_offset = if pattern.slices() == 1 { slice * pattern.nnz() } else { 0 };
        let mut dense = Array2::zeros((pattern.seq_q() as usize, pattern.seq_kv() as usize));
        for qb in 0..pattern.q_blocks() as usize {
            for b in pattern.row_blocks(ps, qb) {
                let kb = pattern.col_idx()[b] as usize;
                let start = (tile_offset + b) * bq * bk;
                let tile = self.tiles.get(start..start + bq * bk).ok_or_else(|| Error::Shape(format!("slice {slice}: block {b}'s tile lies past the {} probabilities held", self.tiles.len())))?;
                for r in 0..bq {
                    for c in 0..bk {
                        let (i, j) = (qb * bq + r, kb * bk + c);
                        if i < dense.nrows() && j < dense.ncols() {
                            dense[[i, j]] = tile[r * bk + c];
                        }
                    }
                }
            }
        }
        Ok(dense)
    }
}

/// Per query row: support size (entries with p > 0) and threshold-search iterations.
#[derive(Clone, Debug)]
pub struct RowStats {
    /// `[slices, seq_q]`.
    pub support: Array2<u32>,
    /// `[slices, seq_q]`; 0 for softmax.
    pub iterations: Array2<u32>,
}

/// Which branches the fused entmax kernels took in one call, counted per workgroup (a tile of
/// query rows of one slice). Every tile ends in exactly one of `cache_gathered`,
/// `cache_staged`, `pool_gathered` and `pool_recomputed`; the other fields count events
/// inside the pooling kernel's tiles. For tests and tuning: which path ran is data-dependent.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct EntmaxPaths {
    /// Score-cache tiles whose p·V read only their support's V rows.
    pub cache_gathered: u32,
    /// Score-cache tiles that staged V for every chunk holding a p > 0.
    pub cache_staged: u32,
    /// Pooling tiles whose τ was exact over their pools, with O gathered from the pooled keys.
    pub pool_gathered: u32,
    /// Pooling tiles that fell back to recomputing the threshold search over the whole row.
    pub pool_recomputed: u32,
    /// Pool shrinks (all rows of a tile at once), summed over tiles.
    pub pool_shrinks: u32,
    /// Chunks where a lane might have filled its pool but none would: no shrink.
    pub pool_shrinks_declined: u32,
    /// Collect walks (rows whose lane pools overflowed re-walk the row), summed over tiles.
    pub pool_collect_walks: u32,
}

impl std::fmt::Display for EntmaxPaths {
    /// `name=count` pairs joined by `;` (the bench's `entmax_paths` column).
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let pairs: Vec<String> = Self::NAMES.iter().zip(self.counts()).map(|(name, n)| format!("{name}={n}")).collect();
        f.write_str(&pairs.join(";"))
    }
}

impl EntmaxPaths {
    /// The counters in the order of their words in `Workspace::entmax_paths`; the kernels'
    /// header declares `PATH_<NAME>` as each one's index (src/gpu/kernels.rs).
    pub const NAMES: [&'static str; 7] =
        ["cache_gathered", "cache_staged", "pool_gathered", "pool_recomputed", "pool_shrinks", "pool_shrinks_declined", "pool_collect_walks"];

    /// The counts in `NAMES` order.
    pub fn counts(&self) -> [u32; 7] {
        [self.cache_gathered, self.cache_staged, self.pool_gathered, self.pool_recomputed, self.pool_shrinks, self.pool_shrinks_declined, self.pool_collect_walks]
    }

    fn from_words(w: &[u32]) -> Self {
        let at = |i: usize| w.get(i).copied().unwrap_or(0);
        Self {
            cache_gathered: at(0),
            cache_staged: at(1),
            pool_gathered: at(2),
            pool_recomputed: at(3),
            pool_shrinks: at(4),
            pool_shrinks_declined: at(5),
            pool_collect_walks: at(6),
        }
    }

    /// Tiles that ran to the end, over both kernels.
    pub fn tiles(&self) -> u64 {
        [self.cache_gathered, self.cache_staged, self.pool_gathered, self.pool_recomputed].iter().map(|&x| x as u64).sum()
    }
}

/// Output of [`Engine::attention_with`].
#[derive(Clone, Debug)]
pub struct AttentionOutput {
    pub o: Array4<f32>,
    pub probabilities: Option<SparseProbabilities>,
    pub row_stats: Option<RowStats>,
    /// The fused entmax kernels' branch counts (fused entmax calls only).
    pub entmax_paths: Option<EntmaxPaths>,
}

/// A pattern uploaded for the kernels (see [`plan::pack_pattern`]); made only by
/// [`Engine::upload_pattern`], so its buffer always holds the pattern its layout describes.
#[derive(Debug)]
pub struct GpuPattern {
    buffer: wgpu::Buffer,
    layout: plan::PackedPatternLayout,
}

impl GpuPattern {
    pub fn buffer(&self) -> &wgpu::Buffer {
        &self.buffer
    }
    pub fn layout(&self) -> &plan::PackedPatternLayout {
        &self.layout
    }
}

/// Scratch: score tiles of the largest chunk and row stats (three-kernel path), the
/// key-split partials of the fused softmax (split-K), and the fused entmax kernels' branch
/// counts ([`EntmaxPaths`], cleared by each encode that runs them).
#[derive(Debug)]
pub struct Workspace {
    pub scores: wgpu::Buffer,
    pub stats: wgpu::Buffer,
    pub partials: wgpu::Buffer,
    pub entmax_paths: wgpu::Buffer,
}

/// Q, K, V agree in shape and hold finite values, the scores stay inside f32, and with f16
/// storage every value fits f16; returns the shape.
fn check_inputs<'a>(q: &ArrayView4<'a, f32>, k: &ArrayView4<'a, f32>, v: &ArrayView4<'a, f32>, opts: &AttentionOptions) -> Result<AttentionShape> {
    let shape = validate_qkv(q, k, v)?;
    crate::shape::check_score_range(q, k, opts.scale.unwrap_or_else(|| shape.default_scale()))?;
    if opts.dtype == DType::F16 {
        for (name, a) in [("q", q), ("k", k), ("v", v)] {
            if let Some((index, &value)) = a.iter().enumerate().find(|(_, x)| x.abs() > half::f16::MAX.to_f32()) {
                return Err(Error::Unsupported(format!("{name}[{index}] = {value} is outside the f16 range (±65504)")));
            }
        }
    }
    Ok(shape)
}

/// Row stats scratch: (support, iterations) per padded query row of every slice.
fn row_stats_bytes(plan: &Plan) -> u64 {
    let rows = plan.shape.slices() as u64 * plan.shape.seq_q.div_ceil(plan.block_q as usize) as u64 * plan.block_q as u64;
    (rows * 2 * 4).max(4)
}

/// One part of a call run in buffer groups (`Engine::buffer_groups`): batch entries × kv heads
/// × the query heads of each kv head's group (`0..group` unless one kv head is split).
#[derive(Clone, Debug, PartialEq, Eq)]
struct BufferGroup {
    batches: std::ops::Range<usize>,
    kv_heads: std::ops::Range<usize>,
    group_heads: std::ops::Range<usize>,
}

/// The fused entmax kernels' branch counters, one word each, padded to 16 bytes.
const ENTMAX_PATHS_BYTES: u64 = (EntmaxPaths::NAMES.len() * 4).next_multiple_of(16) as u64;

/// The caller's tensors for [`Engine::encode`], in the plan's dtype, row-major as in DESIGN.md,
/// with STORAGE usage.
#[derive(Clone, Copy, Debug)]
pub struct AttentionBuffers<'a> {
    pub q: &'a wgpu::Buffer,
    pub k: &'a wgpu::Buffer,
    pub v: &'a wgpu::Buffer,
    pub o: &'a wgpu::Buffer,
}

/// One compute pass running `kernel` over `grid` (timed when `timer` has room); nothing for
/// an empty grid.
fn dispatch(encoder: &mut wgpu::CommandEncoder, timer: Option<&mut super::timing::PassTimer>, kernel: &Kernel, bind_group: &wgpu::BindGroup, grid: plan::Grid) {
    if grid.is_empty() {
        return;
    }
    let timestamp_writes = timer.and_then(|t| t.pass_writes(kernel.key.kind.name()));
    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(kernel.key.kind.name()), timestamp_writes });
    pass.set_pipeline(&kernel.pipeline);
    pass.set_bind_group(0, bind_group, &[]);
    pass.dispatch_workgroups(grid.x, grid.y, 1);
}

/// Binds `w` of `buf`, clipped to the buffer's end.
fn bind(buf: &wgpu::Buffer, w: Window) -> wgpu::BindingResource<'_> {
    let size = w.size.min(buf.size().saturating_sub(w.offset));
    wgpu::BindingResource::Buffer(wgpu::BufferBinding { buffer: buf, offset: w.offset, size: std::num::NonZeroU64::new(size) })
}

/// The engine. Create with [`Engine::new`] (default adapter) or [`Engine::from_wgpu`].
#[derive(Debug)]
pub struct Engine {
    device: wgpu::Device,
    queue: wgpu::Queue,
    info: wgpu::AdapterInfo,
    caps: Capabilities,
    plan_limits: PlanLimits,
    kernels: KernelCache,
    tiles: TileCache,
    autotune: bool,
    /// MRA's low-resolution pipelines, compiled on first use.
    mra_lowres: std::sync::OnceLock<crate::patterns::mra::gpu::GpuMraLowRes>,
    lowrank: std::sync::OnceLock<crate::lowrank::GpuLowRank>,
    pooling: std::sync::OnceLock<crate::pooling::GpuPooling>,
}

/// Env switch: `SPARSE_ATTN_AUTOTUNE=0` keeps the default fused tile instead of timing candidates.
pub const ENV_AUTOTUNE: &str = "SPARSE_ATTN_AUTOTUNE";

/// The tuner's synthetic problem (one batch entry).
struct StandIn {
    pattern: BlockPattern,
    q: Array4<f32>,
    k: Array4<f32>,
    v: Array4<f32>,
}

impl Engine {
    /// Best adapter (discrete → integrated → CPU), or the one `SPARSE_ATTN_ADAPTER` names.
    pub fn new() -> Result<Self> {
        let filter = std::env::var(device::ENV_ADAPTER).ok().filter(|s| !s.is_empty());
        Self::with_adapter(filter.as_deref())
    }

    /// Like [`Engine::new`] with an explicit adapter filter (backend name or name substring).
    pub fn with_adapter(filter: Option<&str>) -> Result<Self> {
        let adapter = device::choose_adapter(filter)?;
        let limits = adapter.limits();
        device::required_limits_check(&limits)?;
        let features = device::wanted_features(adapter.features());
        let (device, queue) = pollster::block_on(adapter.request_device(&wgpu::DeviceDescriptor {
            label: Some("sparse-attn device"),
            required_features: features,
            required_limits: limits,
            ..Default::default()
        }))?;
        Self::from_wgpu(device, queue)
    }

    /// Shares the caller's device and queue. Fails if the device lacks a required limit.
    pub fn from_wgpu(device: wgpu::Device, queue: wgpu::Queue) -> Result<Self> {
        let limits = device.limits();
        device::required_limits_check(&limits)?;
        let info = device.adapter_info();
        let caps = device::capabilities(device.features(), &info);
        tracing::info!(adapter = %info.name, backend = ?info.backend, ?caps, "sparse-attn engine ready");
        let autotune = std::env::var(ENV_AUTOTUNE).map_or(true, |v| v != "0");
        Ok(Self {
            plan_limits: PlanLimits::from_wgpu(&limits),
            device,
            queue,
            info,
            caps,
            kernels: KernelCache::default(),
            tiles: TileCache::default(),
            autotune,
            mra_lowres: std::sync::OnceLock::new(),
            lowrank: std::sync::OnceLock::new(),
            pooling: std::sync::OnceLock::new(),
        })
    }

    pub fn device(&self) -> &wgpu::Device {
        &self.device
    }
    pub fn queue(&self) -> &wgpu::Queue {
        &self.queue
    }
    pub fn adapter_info(&self) -> &wgpu::AdapterInfo {
        &self.info
    }
    pub fn capabilities(&self) -> Capabilities {
        self.caps
    }
    pub fn plan_limits(&self) -> PlanLimits {
        self.plan_limits
    }

    /// Lowers the limits the planner uses (never above the device's): forces chunking in tests.
    pub fn set_plan_limits(&mut self, limits: PlanLimits) {
        let dev = PlanLimits::from_wgpu(&self.device.limits());
        self.plan_limits = PlanLimits {
            max_binding_bytes: limits.max_binding_bytes.min(dev.max_binding_bytes),
            max_workgroups_per_dim: limits.max_workgroups_per_dim.clamp(1, dev.max_workgroups_per_dim),
            binding_alignment: limits.binding_alignment.max(dev.binding_alignment),
            max_buffer_bytes: limits.max_buffer_bytes.min(dev.max_buffer_bytes),
        };
    }

    /// MRA's low-resolution pipelines on this engine, compiled on the first call.
    pub fn mra_lowres(&self) -> Result<&crate::patterns::mra::gpu::GpuMraLowRes> {
        if let Some(g) = self.mra_lowres.get() {
            return Ok(g);
        }
        let compiled = crate::patterns::mra::gpu::GpuMraLowRes::new(self)?;
        Ok(self.mra_lowres.get_or_init(|| compiled))
    }

    /// The low-rank reconstruction's pipelines on this engine, compiled on the first call.
    pub fn lowrank(&self) -> Result<&crate::lowrank::GpuLowRank> {
        if let Some(g) = self.lowrank.get() {
            return Ok(g);
        }
        let compiled = crate::lowrank::GpuLowRank::new(self)?;
        Ok(self.lowrank.get_or_init(|| compiled))
    }

    /// The top-k pooling pipeline on this engine, compiled on the first call.
    pub fn pooling(&self) -> Result<&crate::pooling::GpuPooling> {
        if let Some(g) = self.pooling.get() {
            return Ok(g);
        }
        let compiled = crate::pooling::GpuPooling::new(self)?;
        Ok(self.pooling.get_or_init(|| compiled))
    }

    /// Number of compiled pipelines (for tests of the cache).
    pub fn compiled_pipelines(&self) -> usize {
        self.kernels.len()
    }

    /// Forces the fallbacks of optional features in this engine (as the env switches
    /// `SPARSE_ATTN_NO_F16` / `SPARSE_ATTN_NO_SUBGROUPS` do process-wide): tests cover both.
    pub fn force_fallbacks(&mut self, no_f16: bool, no_subgroups: bool) {
        self.caps.f16 &= !no_f16;
        self.caps.subgroups &= !no_subgroups;
    }

    /// Turns fused-tile tuning on or off (on by default unless `SPARSE_ATTN_AUTOTUNE=0`).
    pub fn set_autotune(&mut self, on: bool) {
        self.autotune = on;
    }

    /// Number of tuned tile choices held in memory.
    pub fn tuned_tiles(&self) -> usize {
        self.tiles.len()
    }

    /// Fused tiles this adapter can run for `pattern` and `head_dim`: `fused_tile_candidates`,
    /// and for entmax also the score-caching tiles when the pattern's longest row fits them
    /// (the tuner's candidate set for this call).
    pub fn fused_tile_candidates_for(&self, pattern: &BlockPattern, head_dim: usize, normalizer: Normalizer) -> Vec<FusedTile> {
        let entmax = normalizer.alpha().is_some();
        tiles::call_candidates(pattern.block_q(), pattern.block_k(), head_dim as u32, entmax, Some(pattern.max_row_blocks()), &self.device.limits())
    }

    /// Fused tiles this adapter can run for a problem with these blocks (the softmax tiles, or
    /// the pooling entmax tiles, which run rows of any length).
    pub fn fused_tile_candidates(&self, block_q: u32, block_k: u32, head_dim: usize, normalizer: Normalizer) -> Vec<FusedTile> {
        tiles::candidates(block_q, block_k, head_dim as u32, normalizer.alpha().is_some(), &self.device.limits())
    }

    fn plan_options(&self, shape: &AttentionShape, pattern: &BlockPattern, opts: &AttentionOptions) -> Result<PlanOptions> {
        if opts.dtype == DType::F16 && !self.caps.f16 {
            return Err(Error::Unsupported(format!(
                "f16 storage needs SHADER_F16, which adapter `{}` lacks (or {} is set)",
                self.info.name,
                device::ENV_NO_F16
            )));
        }
        plan::check_entmax_stopping(opts.tolerance, opts.max_iterations)?;
        opts.normalizer.validate()?;
        let wants_outputs = opts.return_probabilities || opts.return_row_stats;
        let classes = match opts.path {
            ExecPath::ThreeKernel => Vec::new(),
            ExecPath::Fused if wants_outputs => {
                return Err(fused_has_no_outputs())
            }
            ExecPath::Fused => self.fused_classes(shape, pattern, opts)?,
            // Auto: fused when it can run, the three-kernel path otherwise (guaranteed fallback).
            ExecPath::Auto if wants_outputs => Vec::new(),
            // A forced tile asks for the fused path: one that cannot run is an error, not a
            // silent switch to the (much slower) three-kernel path.
            ExecPath::Auto if opts.fused_tile.is_some() => self.fused_classes(shape, pattern, opts)?,
            ExecPath::Auto => self.fused_classes(shape, pattern, opts).unwrap_or_default(),
        };
        let fused = classes.last().map(|c| c.tile);
        Ok(PlanOptions {
            normalizer: opts.normalizer,
            scale: opts.scale.unwrap_or_else(|| shape.default_scale()),
            dtype: opts.dtype,
            tolerance: opts.tolerance,
            max_iterations: opts.max_iterations,
            fused,
            row_classes: if classes.len() > 1 { classes } else { Vec::new() },
            key_splits: opts.key_splits,
        })
    }

    /// The fused path's tiles by row class: one tile for every row, except for entmax without
    /// a forced tile, where each score-cache bucket of row lengths present in the pattern
    /// ([`tiles::row_class_bounds`]) gets the tile tuned (or picked) for its longest row, and
    /// neighbouring buckets that got the same tile run as one class. So a few long rows no
    /// longer send every row to the pooling kernel or to a slower cache tile.
    fn fused_classes(&self, shape: &AttentionShape, pattern: &BlockPattern, opts: &AttentionOptions) -> Result<Vec<RowClass>> {
        if opts.normalizer.alpha().is_none() || opts.fused_tile.is_some() {
            return Ok(vec![RowClass { max_blocks: u32::MAX, tile: self.fused_tile(shape, pattern, opts, pattern.max_row_blocks())? }]);
        }
        let mut classes: Vec<RowClass> = Vec::new();
        for longest in tiles::row_class_bounds(pattern) {
            let tile = self.fused_tile(shape, pattern, opts, longest)?;
            match classes.last_mut() {
                Some(c) if c.tile == tile => c.max_blocks = longest,
                _ => classes.push(RowClass { max_blocks: longest, tile }),
            }
        }
        Ok(classes)
    }

    /// The fused tile for rows of at most `row_blocks` stored blocks of `pattern` (a forced
    /// tile is checked against the whole pattern).
    fn fused_tile(&self, shape: &AttentionShape, pattern: &BlockPattern, opts: &AttentionOptions, row_blocks: u32) -> Result<FusedTile> {
        let entmax = opts.normalizer.alpha().is_some();
        let limits = self.device.limits();
        let (bq, bk, d) = (pattern.block_q(), pattern.block_k(), shape.head_dim as u32);
        if entmax && shape.seq_kv > tiles::MAX_FUSED_ENTMAX_SEQ_KV {
            return Err(Error::Unsupported(format!(
                "the fused entmax kernel keeps key indices as f32 (exact up to {} keys), got seq_kv {}",
                tiles::MAX_FUSED_ENTMAX_SEQ_KV,
                shape.seq_kv
            )));
        }
        // Entmax rows that fit a score cache may take the score-caching kernel as well.
        let fitting = tiles::call_candidates(bq, bk, d, entmax, Some(row_blocks), &limits);
        let cached: Vec<FusedTile> = fitting.iter().copied().filter(|t| t.rc > 0).collect();
        if let Some(t) = opts.fused_tile {
            if !tiles::accepts(&fitting, &t, &limits) {
                let list: Vec<String> = fitting.iter().map(|f| format!("{f:?}")).collect();
                return Err(Error::Unsupported(format!(
                    "fused tile {t:?} is not one of the {} {} tiles for head_dim {d}, blocks {bq}x{bk}{} within max_compute_workgroup_storage_size = {} bytes (it needs {}): {}",
                    fitting.len(),
                    if entmax { "entmax" } else { "softmax" },
                    if entmax { format!(", rows of up to {row_blocks} blocks") } else { String::new() },
                    limits.max_compute_workgroup_storage_size,
                    t.workgroup_bytes(),
                    list.join(", ")
                )));
            }
            return Ok(t);
        }
        let key = TuneKey {
            adapter: self.info.name.clone(),
            entmax,
            f16: opts.dtype == DType::F16,
            block_q: bq,
            block_k: bk,
            head_dim: d,
            seq_bucket: TuneKey::seq_bucket(shape.seq_kv),
            row_blocks: if cached.is_empty() { 0 } else { row_blocks },
        };
        // A cached choice (possibly from an older build's disk cache) must still be a candidate.
        if let Some(t) = self.tiles.get(&key).filter(|t| fitting.contains(t)) {
            return Ok(t);
        }
        // Untuned: the score-caching kernel when the rows fit it (each score computed once,
        // every V load shared by the tile's rows), else the pooling kernel's first tile.
        let fallback = match cached.first() {
            Some(&t) => t,
            None => tiles::default_tile(bq, bk, d, entmax, &limits)?,
        };
        if !self.autotune {
            return Ok(fallback);
        }
        // A tuning where no candidate ran keeps the fallback for this engine only: a later
        // process (a fixed driver, another adapter state) tunes again rather than reading it
        // from the disk cache as a timed choice.
        match self.tune(&key, opts) {
            Some(best) => {
                self.tiles.insert(key, best);
                Ok(best)
            }
            None => {
                tracing::warn!(?key, ?fallback, "no fused tile candidate ran while tuning; using the default tile");
                self.tiles.remember(key, fallback);
                Ok(fallback)
            }
        }
    }

    /// Times each candidate tile (median of `TUNE_REPEATS` runs after one warm-up, in rounds
    /// that interleave the candidates) on a synthetic problem standing in for the key's bucket
    /// and returns the fastest; None when no candidate ran. The stand-in has at most
    /// `TUNE_MAX_SEQ` tokens (tuning must stay cheap on slow adapters) and seeded data whose
    /// scores spread like real attention (std ≈ 1 in even heads, ≈ 0.45 in odd ones), so entmax
    /// rows have realistic supports, narrow and broad. It has as many heads as
    /// [`tiles::stand_in_heads`] finds it needs to keep the adapter busy: timed on a handful of
    /// workgroups, a GPU would rank tiles by their latency, not by their throughput on the
    /// calls that matter (a large tile leaves most of its cores idle there).
    fn tune(&self, key: &TuneKey, opts: &AttentionOptions) -> Option<FusedTile> {
        const TUNE_MAX_SEQ: usize = 1024;
        // Timed runs per candidate (the median counts): two were a coin toss between close
        // tiles on a noisy adapter; the compiles cost far more than these runs.
        const TUNE_REPEATS: usize = 5;
        let d = key.head_dim as usize;
        let n = (key.seq_bucket as usize).min(TUNE_MAX_SEQ);
        let row_blocks = (key.row_blocks > 0).then_some(key.row_blocks);
        let candidates = tiles::call_candidates(key.block_q, key.block_k, key.head_dim, key.entmax, row_blocks, &self.device.limits());
        let stand_in = |heads: usize| -> Option<StandIn> {
            let shape = AttentionShape::new(1, heads, n, d);
            let pattern = if key.row_blocks > 0 {
                Self::stand_in_rows(&shape, key.block_q, key.block_k, key.row_blocks).ok()?
            } else {
                crate::patterns::Dense::new().with_blocks(key.block_q, key.block_k).build(&shape).ok()?
            };
            let data = |seed: u64| {
                use rand::{Rng, SeedableRng};
                let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
                Array4::from_shape_simple_fn((1, heads, n, d), || rng.random::<f32>() * 3.4 - 1.7)
            };
            let (mut q, k, v) = (data(1), data(2), data(3));
            // Odd heads are flatter (score std ≈ 0.45): their entmax rows keep ~6 % of the
            // keys, as the broad heads of real models do, so an entmax tile whose pools cannot
            // hold such rows pays for its fallback here rather than on the caller's data.
            for h in (1..heads).step_by(2) {
                q.index_axis_mut(ndarray::Axis(1), h).mapv_inplace(|x| x * 0.47);
            }
            Some(StandIn { pattern, q, k, v })
        };
        // `tile` prepared on `s` and run once as a warm-up; None when it failed to build or run
        // (an error any scope caught counts: the driver may reject a tile the limits allowed).
        let warmed = |tile: FusedTile, s: &StandIn| {
            let o = AttentionOptions { path: ExecPath::Fused, fused_tile: Some(tile), return_probabilities: false, return_row_stats: false, ..*opts };
            let scope = super::kernels::ErrorScopes::push(&self.device);
            let warm = self.prepare_attention(&s.q, &s.k, &s.v, &s.pattern, &o).and_then(|p| p.time(1, 0).map(|_| p));
            let failed = scope.pop().is_some();
            warm.ok().filter(|_| !failed)
        };
        // How many heads keep the adapter busy, timed on the first candidate; the size it
        // settles on is the last one that ran, whose stand-in is kept.
        let probe = candidates.first().copied()?;
        let mut last_ran: Option<(usize, StandIn)> = None;
        let heads = tiles::stand_in_heads(n, |heads| {
            let s = stand_in(heads)?;
            let ms = warmed(probe, &s)?.time(0, 1).ok()?.median_ms();
            last_ran = Some((heads, s));
            Some(ms)
        });
        let s = match last_ran {
            Some((ran, s)) if ran == heads => s,
            _ => stand_in(heads)?,
        };
        tracing::debug!(?key, heads, seq = n, "tuning on a stand-in");
        // Every fitting candidate: the sets are small (10 at most, 12 for entmax rows that fit a
        // score cache), and a cut would silently drop the last ones as candidates are added.
        let mut prepared = Vec::new();
        for tile in candidates {
            if let Some(p) = warmed(tile, &s) {
                prepared.push((tile, p, Vec::with_capacity(TUNE_REPEATS)));
            }
        }
        // Rounds over all candidates, one run each, so a drift in the adapter's speed (frequent
        // on shared or CPU adapters) hits every candidate alike instead of favouring the ones
        // timed in a fast spell.
        for _ in 0..TUNE_REPEATS {
            for (_, p, runs) in prepared.iter_mut() {
                if let Ok(t) = p.time(0, 1) {
                    runs.push(t.median_ms());
                }
            }
        }
        let mut best: Option<(f64, FusedTile)> = None;
        for (tile, _, runs) in &prepared {
            if runs.len() < TUNE_REPEATS {
                continue;
            }
            let ms = median(runs);
            tracing::debug!(?tile, ms, heads, "tile candidate");
            if best.is_none_or(|(b, _)| ms < b) {
                best = Some((ms, *tile));
            }
        }
        best.map(|(_, t)| t)
    }

    /// The tuner's stand-in for rows of `row_blocks` stored blocks: query block row `qb` keeps
    /// the full key blocks qb, qb + 1, … (wrapping), so every row is that long.
    fn stand_in_rows(shape: &AttentionShape, block_q: u32, block_k: u32, row_blocks: u32) -> Result<BlockPattern> {
        use crate::pattern::{BlockMask, PatternAccumulator, PatternGeometry};
        let g = PatternGeometry { block_q, block_k, seq_q: shape.seq_q as u32, seq_kv: shape.seq_kv as u32, slices: 1 };
        let k_blocks = g.k_blocks();
        let mut acc = PatternAccumulator::new(g)?;
        for qb in 0..g.q_blocks() {
            let mut blocks: Vec<u32> = (0..row_blocks.min(k_blocks)).map(|j| (qb + j) % k_blocks).collect();
            blocks.sort_unstable();
            acc.push_row(blocks.into_iter().map(|b| (b, BlockMask::Full)));
        }
        Ok(acc.finish()?)
    }

    /// Plans a call (pure apart from choosing the fused tile, which may time candidates once).
    pub fn plan(&self, shape: &AttentionShape, pattern: &BlockPattern, opts: &AttentionOptions) -> Result<Plan> {
        let p = self.plan_options(shape, pattern, opts)?;
        plan::plan(shape, pattern, &p, &self.plan_limits)
    }

    /// Uploads a pattern once; reuse it across calls with the same pattern.
    pub fn upload_pattern(&self, pattern: &BlockPattern) -> GpuPattern {
        self.upload_pattern_in(pattern, plan::PackedPatternLayout::of(pattern))
    }

    /// `upload_pattern` with the layout already computed from this pattern (a plan's).
    fn upload_pattern_in(&self, pattern: &BlockPattern, layout: plan::PackedPatternLayout) -> GpuPattern {
        let words = plan::pack_pattern(pattern, &layout);
        let buffer = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("sparse-attn pattern"),
            contents: bytemuck::cast_slice(&words),
            usage: wgpu::BufferUsages::STORAGE,
        });
        GpuPattern { buffer, layout }
    }

    /// Scratch buffers sized for `plan`.
    pub fn create_workspace(&self, plan: &Plan) -> Workspace {
        Workspace {
            scores: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sparse-attn scores scratch"),
                size: plan.scratch_bytes,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            stats: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sparse-attn row stats"),
                size: row_stats_bytes(plan),
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                mapped_at_creation: false,
            }),
            partials: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sparse-attn key-split partials"),
                size: plan.partial_bytes.max(16),
                usage: wgpu::BufferUsages::STORAGE,
                mapped_at_creation: false,
            }),
            entmax_paths: self.device.create_buffer(&wgpu::BufferDescriptor {
                label: Some("sparse-attn entmax path counts"),
                size: ENTMAX_PATHS_BYTES,
                usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC | wgpu::BufferUsages::COPY_DST,
                mapped_at_creation: false,
            }),
        }
    }

    /// The cached pipeline for `key` (compiled on first use).
    pub(crate) fn kernel_for(&self, key: KernelKey) -> Result<std::sync::Arc<Kernel>> {
        self.kernels.get(&self.device, key)
    }

    fn kernel(&self, kind: KernelKind, plan: &Plan) -> Result<std::sync::Arc<Kernel>> {
        self.kernel_with_tile(kind, plan, plan.fused)
    }

    /// `kind`'s pipeline for `plan` with the fused tile `tile` (a row class's).
    fn kernel_with_tile(&self, kind: KernelKind, plan: &Plan, tile: Option<FusedTile>) -> Result<std::sync::Arc<Kernel>> {
        let d_chunk = if matches!(kind, KernelKind::Spmm | KernelKind::SpmmMra) { plan.d_chunk } else { 0 };
        let fused = if kind.is_fused() { tile } else { None };
        let subgroups = self.caps.subgroups
            && match kind {
                KernelKind::NormalizeSoftmax | KernelKind::NormalizeEntmax | KernelKind::NormalizeSoftmaxMra => true,
                // `fused` is the tile for fused kinds, None otherwise.
                _ => fused.is_some_and(|t| t.row_lanes_fit_subgroups(self.caps.subgroup_min_size)),
            };
        let vec4 = kind.is_fused() && plan.shape.head_dim.is_multiple_of(4);
        self.kernels.get(&self.device, KernelKey { kind, dtype: plan.dtype, block_q: plan.block_q, block_k: plan.block_k, d_chunk, fused, subgroups, vec4 })
    }

    /// Compiles every pipeline `plan` needs (so the hot path compiles nothing).
    pub fn prepare(&self, plan: &Plan) -> Result<()> {
        for kind in Self::kinds(plan, false) {
            self.kernel(kind, plan)?;
        }
        for class in &plan.row_classes {
            self.kernel_with_tile(Self::entmax_kind(class.tile), plan, Some(class.tile))?;
        }
        Ok(())
    }

    /// The fused entmax kernel that runs `tile`: the score cache's or the pooling one.
    fn entmax_kind(tile: FusedTile) -> KernelKind {
        if tile.rc > 0 {
            KernelKind::FusedEntmaxCached
        } else {
            KernelKind::FusedEntmax
        }
    }

    /// Kernels a plan runs, in order (`mra`: the variants that merge an MRA remainder).
    fn kinds(plan: &Plan, mra: bool) -> Vec<KernelKind> {
        let softmax = plan.normalizer == Normalizer::Softmax;
        let split = plan.key_splits > 1;
        if mra && softmax {
            return match plan.path {
                ExecPath::Fused if split => vec![KernelKind::FusedSoftmaxMra, KernelKind::MergeSplits],
                ExecPath::Fused => vec![KernelKind::FusedSoftmaxMra],
                _ => vec![KernelKind::Sddmm, KernelKind::NormalizeSoftmaxMra, KernelKind::SpmmMra],
            };
        }
        match (plan.path, softmax) {
            (ExecPath::Fused, true) if split => vec![KernelKind::FusedSoftmax, KernelKind::MergeSplits],
            (ExecPath::Fused, true) => vec![KernelKind::FusedSoftmax],
            (ExecPath::Fused, false) => plan.fused.map(Self::entmax_kind).into_iter().collect(),
            (_, true) => vec![KernelKind::Sddmm, KernelKind::NormalizeSoftmax, KernelKind::Spmm],
            (_, false) => vec![KernelKind::Sddmm, KernelKind::NormalizeEntmax, KernelKind::Spmm],
        }
    }

    /// Records the three-kernel path for `plan` into `encoder`. With `probabilities`, each
    /// chunk's normalised tiles are copied there (size `plan.total_tiles * bq * bk * 4`).
    // The lower layer's documented signature: the caller's encoder and buffers, the plan's
    // pattern and workspace, and the two optional outputs, each a separate borrow.
    #[allow(clippy::too_many_arguments)]
    pub fn encode(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        plan: &Plan,
        buffers: AttentionBuffers<'_>,
        pattern: &GpuPattern,
        workspace: &Workspace,
        probabilities: Option<&wgpu::Buffer>,
        timer: Option<&mut super::timing::PassTimer>,
    ) -> Result<()> {
        self.encode_inner(encoder, plan, buffers, pattern, workspace, probabilities, timer, None)
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_inner(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        plan: &Plan,
        buffers: AttentionBuffers<'_>,
        pattern: &GpuPattern,
        workspace: &Workspace,
        probabilities: Option<&wgpu::Buffer>,
        mut timer: Option<&mut super::timing::PassTimer>,
        mra: Option<&MraBuffers>,
    ) -> Result<()> {
        if pattern.layout != plan.layout {
            return Err(Error::Shape("the uploaded pattern is not the one the plan was made for".into()));
        }
        let s = &plan.shape;
        let eb = plan.dtype.bytes();
        let need_q = (s.slices() * s.seq_q * s.head_dim) as u64 * eb;
        let need_kv = (s.batch * s.kv_heads * s.seq_kv * s.head_dim) as u64 * eb;
        for (name, buf, need) in [("q", buffers.q, need_q), ("k", buffers.k, need_kv), ("v", buffers.v, need_kv), ("o", buffers.o, need_q)] {
            if buf.size() < need {
                return Err(Error::Shape(format!("buffer `{name}` has {} bytes, the plan needs {need}", buf.size())));
            }
        }
        if workspace.scores.size() < plan.scratch_bytes
            || workspace.partials.size() < plan.partial_bytes
            || workspace.stats.size() < row_stats_bytes(plan)
            || workspace.entmax_paths.size() < ENTMAX_PATHS_BYTES
        {
            return Err(Error::Shape("workspace was created for a smaller plan".into()));
        }
        if let Some(dst) = probabilities {
            let need = plan.total_tiles * (plan.block_q * plan.block_k) as u64 * 4;
            if dst.size() < need || !dst.usage().contains(wgpu::BufferUsages::COPY_DST) {
                return Err(Error::Shape(format!("the probabilities buffer needs {need} bytes and COPY_DST usage; it has {} bytes, {:?}", dst.size(), dst.usage())));
            }
        }
        if plan.path == ExecPath::Fused {
            if probabilities.is_some() {
                return Err(fused_has_no_outputs());
            }
            return self.encode_fused(encoder, plan, buffers, pattern, workspace, timer, mra);
        }
        let tile_bytes = (plan.block_q * plan.block_k) as u64 * 4;
        let kinds = Self::kinds(plan, mra.is_some());
        let sddmm = self.kernel(kinds[0], plan)?;
        let normalize = self.kernel(kinds[1], plan)?;
        let spmm = self.kernel(kinds[2], plan)?;
        for (ci, chunk) in plan.chunks.iter().enumerate() {
            let uniform = self.params_buffer(&chunk.params);
            let scores_size = ((chunk.tiles.end - chunk.tiles.start) as u64 * tile_bytes).max(tile_bytes);
            let scores = Window { offset: 0, size: scores_size, base: chunk.params.scores_base };
            let group = |k: &Kernel, resources: Vec<wgpu::BindingResource>| self.bind_group(k, ci, resources);
            let params = uniform.as_entire_binding();
            let pat = pattern.buffer.as_entire_binding();
            let passes = [
                (
                    &sddmm,
                    group(&sddmm, vec![params.clone(), bind(buffers.q, chunk.q), bind(buffers.k, chunk.kv), pat.clone(), bind(&workspace.scores, scores)]),
                    chunk.sddmm,
                ),
                (
                    &normalize,
                    group(&normalize, {
                        let mut r = vec![params.clone(), pat.clone(), bind(&workspace.scores, scores), bind(&workspace.stats, chunk.stats)];
                        if let Some(m) = mra {
                            r.extend([m.rows.as_entire_binding(), m.weights.as_entire_binding()]);
                        }
                        r
                    }),
                    chunk.normalize,
                ),
                (
                    &spmm,
                    group(&spmm, {
                        let mut r = vec![params.clone(), bind(buffers.v, chunk.kv), pat.clone(), bind(&workspace.scores, scores), bind(buffers.o, chunk.o)];
                        if let Some(m) = mra {
                            r.extend([m.rows.as_entire_binding(), m.weights.as_entire_binding()]);
                        }
                        r
                    }),
                    chunk.spmm,
                ),
            ];
            for (stage, (kernel, bind_group, grid)) in passes.iter().enumerate() {
                dispatch(encoder, timer.as_deref_mut(), kernel, bind_group, *grid);
                if stage == 1 {
                    if let Some(dst) = probabilities {
                        let n = (chunk.tiles.end - chunk.tiles.start) as u64 * tile_bytes;
                        if n > 0 {
                            encoder.copy_buffer_to_buffer(&workspace.scores, 0, dst, chunk.tiles.start as u64 * tile_bytes, n);
                        }
                    }
                }
            }
        }
        Ok(())
    }

    #[allow(clippy::too_many_arguments)]
    fn encode_fused(
        &self,
        encoder: &mut wgpu::CommandEncoder,
        plan: &Plan,
        buffers: AttentionBuffers<'_>,
        pattern: &GpuPattern,
        workspace: &Workspace,
        mut timer: Option<&mut super::timing::PassTimer>,
        mra: Option<&MraBuffers>,
    ) -> Result<()> {
        let softmax = plan.normalizer == Normalizer::Softmax;
        let kinds = Self::kinds(plan, mra.is_some());
        // One kernel per row class (softmax plans have one); each class's dispatch covers the
        // chunk's rows and its workgroups skip the rows of other classes.
        let kernels = plan
            .row_classes
            .iter()
            .map(|c| {
                let kind = if softmax { kinds[0] } else { Self::entmax_kind(c.tile) };
                self.kernel_with_tile(kind, plan, Some(c.tile))
            })
            .collect::<Result<Vec<_>>>()?;
        let merge = match kinds.get(1) {
            Some(&kind) => Some(self.kernel(kind, plan)?),
            None => None,
        };
        if !softmax {
            encoder.clear_buffer(&workspace.entmax_paths, 0, None);
        }
        for (ci, chunk) in plan.chunks.iter().enumerate() {
            let mut min_row_blocks = 0;
            for ((class, kernel), &grid) in plan.row_classes.iter().zip(&kernels).zip(&chunk.fused) {
                let (min, max) = (min_row_blocks, class.max_blocks);
                min_row_blocks = class.max_blocks.saturating_add(1);
                if grid.is_empty() {
                    continue;
                }
                let params = if plan.row_classes.len() > 1 { plan::Params { min_row_blocks: min, max_row_blocks: max, ..chunk.params } } else { chunk.params };
                let uniform = self.params_buffer(&params);
                let mut resources = vec![
                    uniform.as_entire_binding(),
                    bind(buffers.q, chunk.q),
                    bind(buffers.k, chunk.kv),
                    bind(buffers.v, chunk.kv),
                    pattern.buffer.as_entire_binding(),
                    bind(buffers.o, chunk.o),
                ];
                if let Some(m) = mra {
                    resources.push(m.rows.as_entire_binding());
                }
                resources.push(if softmax { &workspace.partials } else { &workspace.entmax_paths }.as_entire_binding());
                let bind_group = self.bind_group(kernel, ci, resources);
                dispatch(encoder, timer.as_deref_mut(), kernel, &bind_group, grid);
                // Split-K: combine the chunk's splits into O (the partials are reused by the next chunk).
                if let (Some(merge), false) = (&merge, chunk.merge.is_empty()) {
                    let bind_group = self.bind_group(merge, ci, vec![uniform.as_entire_binding(), workspace.partials.as_entire_binding(), bind(buffers.o, chunk.o)]);
                    dispatch(encoder, timer.as_deref_mut(), merge, &bind_group, chunk.merge);
                }
            }
        }
        Ok(())
    }

    /// The uniform buffer of one chunk's `Params`.
    fn params_buffer(&self, params: &plan::Params) -> wgpu::Buffer {
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("sparse-attn params"),
            contents: bytemuck::bytes_of(params),
            usage: wgpu::BufferUsages::UNIFORM,
        })
    }

    /// A bind group on `kernel`'s layout for chunk `ci`: binding `i` is `resources[i]`.
    fn bind_group(&self, kernel: &Kernel, ci: usize, resources: Vec<wgpu::BindingResource<'_>>) -> wgpu::BindGroup {
        let entries: Vec<wgpu::BindGroupEntry> =
            resources.into_iter().enumerate().map(|(i, resource)| wgpu::BindGroupEntry { binding: i as u32, resource }).collect();
        self.device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some(&format!("sparse-attn {} chunk {ci}", kernel.key.kind.name())),
            layout: &kernel.layout,
            entries: &entries,
        })
    }

    fn upload(&self, label: &str, a: &ArrayView4<f32>, dtype: DType, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        let data: Vec<f32> = a.iter().copied().collect();
        let mut bytes: Vec<u8> = match dtype {
            DType::F32 => bytemuck::cast_slice(&data).to_vec(),
            DType::F16 => {
                let h: Vec<half::f16> = data.iter().map(|&x| half::f16::from_f32(x)).collect();
                bytemuck::cast_slice(&h).to_vec()
            }
        };
        bytes.resize(bytes.len().div_ceil(4) * 4, 0);
        self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents: &bytes, usage })
    }

    /// Attention with the default options for `normalizer` (softmax or entmax), f32 storage.
    pub fn attention<'a>(
        &self,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        v: impl Into<ArrayView4<'a, f32>>,
        pattern: &BlockPattern,
        normalizer: Normalizer,
    ) -> Result<Array4<f32>> {
        Ok(self.attention_with(q, k, v, pattern, &AttentionOptions::new(normalizer))?.o)
    }

    /// Attention with explicit options; optionally returns probabilities and row stats.
    pub fn attention_with<'a>(
        &self,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        v: impl Into<ArrayView4<'a, f32>>,
        pattern: &BlockPattern,
        opts: &AttentionOptions,
    ) -> Result<AttentionOutput> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let shape = crate::shape::AttentionShape::from_qkv(&q, &k, &v)?;
        let pieces = self.buffer_groups(&shape, pattern, opts)?;
        if pieces.len() <= 1 {
            // One call (a buffer past max_buffer_size is then the plan's typed Limit error).
            let prepared = self.prepare_attention(q, k, v, pattern, opts)?;
            return prepared.run_and_read(opts.return_probabilities, opts.return_row_stats);
        }
        check_inputs(&q, &k, &v, opts)?;
        pattern.check_fits(&shape)?;
        self.run_groups(q, k, v, &shape, pattern, opts, &pieces, None)
    }

    /// Runs a call whose buffers pass max_buffer_size as `pieces` (from `buffer_groups`):
    /// groups of batch entries, of one entry's kv heads with their query heads, or of one kv
    /// head's query heads, each its own upload (groups share nothing; a per-slice pattern is cut to the group's slices, which
    /// are consecutive, and so are MRA row terms, `[slices·q_blocks][head_dim + 2]`). The caller
    /// has checked the inputs once, whole, so an error names an index of the caller's tensors.
    /// The groups' slices follow one another, so their probability tiles (slice-major in the
    /// pattern's layout) and row stats join by concatenation.
    #[allow(clippy::too_many_arguments)]
    fn run_groups(
        &self,
        q: ArrayView4<'_, f32>,
        k: ArrayView4<'_, f32>,
        v: ArrayView4<'_, f32>,
        shape: &AttentionShape,
        pattern: &BlockPattern,
        opts: &AttentionOptions,
        pieces: &[BufferGroup],
        mra_rows: Option<&[f32]>,
    ) -> Result<AttentionOutput> {
        let mut o = ndarray::Array4::<f32>::zeros((shape.batch, shape.heads, shape.seq_q, shape.head_dim));
        let mut paths: Option<EntmaxPaths> = None;
        let mut tiles: Vec<f32> = Vec::new();
        let (mut support, mut iterations) = (Vec::new(), Vec::new());
        let rows_per_slice = mra_rows.map_or(0, |rows| rows.len() / shape.slices().max(1));
        for BufferGroup { batches, kv_heads, group_heads } in pieces.iter().cloned() {
            let g = shape.group();
            let heads = kv_heads.start * g + group_heads.start..(kv_heads.end - 1) * g + group_heads.end;
            let first = batches.start * shape.heads + heads.start;
            let last = (batches.end - 1) * shape.heads + heads.end;
            let part = pattern.select_slices(first..last)?;
            let (qs, kvs) = (ndarray::s![batches.clone(), heads.clone(), .., ..], ndarray::s![batches.clone(), kv_heads, .., ..]);
            let (qg, kg, vg) = (q.slice(qs), k.slice(kvs), v.slice(kvs));
            let group_shape = AttentionShape::from_qkv(&qg, &kg, &vg)?;
            let mut prepared = self.prepare_checked(qg, kg, vg, group_shape, &part, opts)?;
            if let Some(rows) = mra_rows {
                let group_rows = rows.get(first * rows_per_slice..last * rows_per_slice).ok_or_else(|| Error::Shape(format!("MRA row terms of slices {first}..{last} lie past the {} floats held", rows.len())))?;
                self.attach_mra(&mut prepared, group_rows)?;
            }
            let out = prepared.run_and_read(opts.return_probabilities, opts.return_row_stats)?;
            if let Some(p) = out.entmax_paths {
                let sum: Vec<u32> = paths.map_or([0; 7], |a| a.counts()).iter().zip(p.counts()).map(|(a, b)| a + b).collect();
                paths = Some(EntmaxPaths::from_words(&sum));
            }
            if let Some(p) = out.probabilities {
                tiles.extend(p.tiles);
            }
            if let Some(r) = out.row_stats {
                support.push(r.support);
                iterations.push(r.iterations);
            }
            o.slice_mut(ndarray::s![batches, heads, .., ..]).assign(&out.o);
        }
        let probabilities = opts.return_probabilities.then(|| SparseProbabilities { block_q: pattern.block_q(), block_k: pattern.block_k(), tiles });
        let join = |parts: Vec<ndarray::Array2<u32>>| {
            let views: Vec<_> = parts.iter().map(|a| a.view()).collect();
            ndarray::concatenate(ndarray::Axis(0), &views).map_err(|e| Error::Gpu(format!("joining row stats of buffer groups: {e}")))
        };
        let row_stats = match opts.return_row_stats {
            true => Some(RowStats { support: join(support)?, iterations: join(iterations)? }),
            false => None,
        };
        Ok(AttentionOutput { o, probabilities, row_stats, entmax_paths: paths })
    }

    /// How a call splits so that each part's buffers fit: its Q/O, K/V, row stats and, when
    /// asked for, its probabilities each fit `max_buffer_size` of the plan limits, a per-slice
    /// pattern's packed words one binding. Consecutive whole batch entries while they fit
    /// together; an entry that does not fit alone as groups of its kv heads (each with its
    /// query heads); a kv head that does not fit alone as groups of its query heads (each with
    /// the kv head). One part when the call fits; a `Limit` naming the buffer when not even one
    /// query head with its kv head fits.
    fn buffer_groups(&self, shape: &AttentionShape, pattern: &BlockPattern, opts: &AttentionOptions) -> Result<Vec<BufferGroup>> {
        let max_buffer = self.plan_limits.max_buffer_bytes;
        // The packed pattern is bound whole; 8 bytes spare for its shared row_ptr end and
        // at-least-one mask word.
        let max_pattern = self.plan_limits.max_binding_bytes.min(max_buffer).saturating_sub(8);
        let max = [max_buffer, max_buffer, max_buffer, max_buffer, max_pattern];
        let g = shape.group();
        let whole = vec![BufferGroup { batches: 0..shape.batch, kv_heads: 0..shape.kv_heads, group_heads: 0..g }];
        let eb = opts.dtype.bytes();
        let (bq, bk) = (pattern.block_q().max(1) as u64, pattern.block_k() as u64);
        let q_head = (shape.seq_q * shape.head_dim) as u64 * eb;
        let kv_head = (shape.seq_kv * shape.head_dim) as u64 * eb;
        let stats_head = (shape.seq_q as u64).div_ceil(bq) * bq * 8;
        // Stored blocks and packed-pattern bytes of each pattern slice, once per call; the
        // pattern's bytes count only for a per-slice pattern (a shared one is the same in
        // every group). A slice past a mismatched pattern counts nothing: the plan reports the
        // mismatch.
        let per_slice = pattern.slices() > 1;
        let pattern_slices: Vec<(u64, u64)> = (0..pattern.slices() as usize)
            .map(|ps| (pattern.slice_nnz(ps) as u64, if per_slice { plan::PackedPatternLayout::slice_words(pattern, ps) * 4 } else { 0 }))
            .collect();
        let slice_cost = |slice: usize| pattern_slices.get(pattern.pattern_slice(slice)).copied().unwrap_or((0, 0));
        let add = |a: [u64; 5], b: [u64; 5]| std::array::from_fn(|i| a[i] + b[i]);
        // [Q/O, K/V, row stats, probabilities, packed pattern] bytes of query heads `heads` (of
        // one group) with their kv head `h` of batch entry `b`.
        let part = |b: usize, h: usize, heads: std::ops::Range<usize>| -> [u64; 5] {
            let n = heads.len() as u64;
            let (tiles, pattern_bytes) = heads.map(|i| slice_cost(b * shape.heads + h * g + i)).fold((0, 0), |a, c| (a.0 + c.0, a.1 + c.1));
            let probs = if opts.return_probabilities { tiles * bq * bk * 4 } else { 0 };
            [n * q_head, kv_head, n * stats_head, probs, pattern_bytes]
        };
        let unit = |b: usize, h: usize| part(b, h, 0..g);
        let fits = |c: [u64; 5]| (0..5).all(|i| c[i] <= max[i]);
        let entry = |b: usize| (0..shape.kv_heads).fold([0; 5], |c, h| add(c, unit(b, h)));
        if fits((0..shape.batch).fold([0; 5], |c, b| add(c, entry(b)))) {
            return Ok(whole);
        }
        const ONE_QUERY_HEAD: [&str; 5] = [
            "max_buffer_size (Q and O of one query head)",
            "max_buffer_size (K and V of one kv head)",
            "max_buffer_size (row stats of one query head)",
            "max_buffer_size (probabilities of one query head)",
            "max_storage_buffer_binding_size (the packed pattern of one query head)",
        ];
        // Greedy over a run of units: groups of consecutive units while their sum fits.
        fn pack(n: usize, cost: impl Fn(usize) -> [u64; 5], fits: impl Fn([u64; 5]) -> bool, add: impl Fn([u64; 5], [u64; 5]) -> [u64; 5]) -> Vec<std::ops::Range<usize>> {
            let (mut out, mut start, mut sum) = (Vec::new(), 0, [0u64; 5]);
            for i in 0..n {
                let c = cost(i);
                if i > start && !fits(add(sum, c)) {
                    out.push(start..i);
                    (start, sum) = (i, c);
                } else {
                    sum = add(sum, c);
                }
            }
            out.push(start..n);
            out
        }
        let mut parts = Vec::new();
        let mut b = 0;
        while b < shape.batch {
            if fits(entry(b)) {
                // The run of entries that fit alone, packed into groups.
                let run_end = (b..shape.batch).find(|&e| !fits(entry(e))).unwrap_or(shape.batch);
                for r in pack(run_end - b, |i| entry(b + i), fits, add) {
                    parts.push(BufferGroup { batches: b + r.start..b + r.end, kv_heads: 0..shape.kv_heads, group_heads: 0..g });
                }
                b = run_end;
                continue;
            }
            let mut h = 0;
            while h < shape.kv_heads {
                if fits(unit(b, h)) {
                    let run_end = (h..shape.kv_heads).find(|&e| !fits(unit(b, e))).unwrap_or(shape.kv_heads);
                    for r in pack(run_end - h, |i| unit(b, h + i), fits, add) {
                        parts.push(BufferGroup { batches: b..b + 1, kv_heads: h + r.start..h + r.end, group_heads: 0..g });
                    }
                    h = run_end;
                    continue;
                }
                for i in 0..g {
                    let one = part(b, h, i..i + 1);
                    if let Some(c) = (0..5).find(|&c| one[c] > max[c]) {
                        return Err(Error::Limit { limit: ONE_QUERY_HEAD[c], required: one[c], available: max[c] });
                    }
                }
                // The kv head is uploaded once per group, whatever its query heads: counted
                // once (it fits, checked above), not once per query head.
                let query_head = |i: usize| {
                    let mut c = part(b, h, i..i + 1);
                    c[1] = 0;
                    c
                };
                for r in pack(g, query_head, fits, add) {
                    parts.push(BufferGroup { batches: b..b + 1, kv_heads: h..h + 1, group_heads: r });
                }
                h += 1;
            }
            b += 1;
        }
        Ok(parts)
    }

    /// MRA attention (Zeng et al. 2022): the selected blocks exactly and, in
    /// [`MraMode::Full`](crate::patterns::mra::MraMode::Full) (MRA-2), every other block's
    /// low-resolution estimate merged into the same softmax, in the fused kernel or the
    /// three-kernel path (`opts.path`). `SparseOnly` (MRA-2-s) is ordinary block-sparse attention
    /// with any normaliser; MRA-2 with entmax is `Unsupported`. The call's scale must be the one
    /// the remainder was built with. With `return_probabilities`, MRA-2 returns the exact part's
    /// probabilities (each row sums to 1 minus the remainder's share).
    pub fn attention_mra<'a>(
        &self,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        v: impl Into<ArrayView4<'a, f32>>,
        mra: &crate::patterns::mra::Mra,
        opts: &AttentionOptions,
    ) -> Result<AttentionOutput> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let shape = AttentionShape::from_qkv(&q, &k, &v)?;
        let pieces = self.buffer_groups(&shape, &mra.pattern, opts)?;
        if pieces.len() <= 1 {
            let prepared = self.prepare_attention_mra(q, k, v, mra, opts)?;
            return prepared.run_and_read(opts.return_probabilities, opts.return_row_stats);
        }
        // Past max_buffer_size: the groups of `attention_with`, each with its slices' row terms.
        check_inputs(&q, &k, &v, opts)?;
        mra.pattern.check_fits(&shape)?;
        let rows = match mra.mode {
            crate::patterns::mra::MraMode::SparseOnly => None,
            crate::patterns::mra::MraMode::Full => Some(self.mra_row_terms(mra, &shape, opts)?),
        };
        self.run_groups(q, k, v, &shape, &mra.pattern, opts, &pieces, rows.as_deref())
    }

    /// [`Engine::prepare_attention`] for an MRA pattern and its remainder.
    pub fn prepare_attention_mra<'a>(
        &self,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        v: impl Into<ArrayView4<'a, f32>>,
        mra: &crate::patterns::mra::Mra,
        opts: &AttentionOptions,
    ) -> Result<PreparedAttention<'_>> {
        use crate::patterns::mra::MraMode;
        let (q, k, v) = (q.into(), k.into(), v.into());
        let mut prepared = self.prepare_attention(q, k, v, &mra.pattern, opts)?;
        if mra.mode == MraMode::SparseOnly {
            return Ok(prepared);
        }
        let rows = self.mra_row_terms(mra, &prepared.plan.shape, opts)?;
        self.attach_mra(&mut prepared, &rows)?;
        Ok(prepared)
    }

    /// MRA-2's row terms for a call of `shape` (checked against the remainder: normaliser,
    /// shape, blocks, scale): folded on the GPU by `MraConfig::build_with_engine`, else on the
    /// CPU now.
    fn mra_row_terms<'m>(&self, mra: &'m crate::patterns::mra::Mra, shape: &AttentionShape, opts: &AttentionOptions) -> Result<std::borrow::Cow<'m, [f32]>> {
        mra.check_normalizer(opts.normalizer)?;
        let rem = &mra.remainder;
        if rem.shape != *shape {
            return Err(Error::Shape(format!("the MRA remainder was built for {:?}, the call is {shape:?}", rem.shape)));
        }
        if rem.block != mra.pattern.block_q() || rem.block != mra.pattern.block_k() {
            return Err(Error::Shape(format!("the MRA remainder has block {}, the pattern {}x{}", rem.block, mra.pattern.block_q(), mra.pattern.block_k())));
        }
        let scale = opts.scale.unwrap_or_else(|| shape.default_scale());
        if (scale - rem.scale).abs() > 1e-6 * rem.scale.abs().max(1.0) {
            return Err(Error::Shape(format!("the call's scale {scale} differs from the MRA remainder's {}", rem.scale)));
        }
        let rows = match rem.precomputed_row_terms() {
            Some(rows) => std::borrow::Cow::Borrowed(rows),
            None => std::borrow::Cow::Owned(rem.row_terms_cpu()?),
        };
        let want_len = shape.slices() * rem.q_blocks as usize * rem.row_stride();
        if rows.len() != want_len {
            return Err(Error::Shape(format!("the MRA remainder has {} row-term floats, its shape needs {want_len}", rows.len())));
        }
        Ok(rows)
    }

    /// Uploads MRA-2 row terms (`[slices·q_blocks][head_dim + 2]` of the prepared call's
    /// slices) and the remainder weights, and compiles the MRA kernels.
    fn attach_mra(&self, prepared: &mut PreparedAttention<'_>, rows: &[f32]) -> Result<()> {
        let shape = prepared.plan.shape;
        let q_blocks = shape.seq_q.div_ceil(prepared.plan.block_q as usize) as u64;
        let want_len = shape.slices() as u64 * q_blocks * (shape.head_dim as u64 + 2);
        if rows.len() as u64 != want_len {
            return Err(Error::Shape(format!("{} MRA row-term floats for a call that needs {want_len}", rows.len())));
        }
        let weights_bytes = (shape.slices() as u64 * q_blocks * prepared.plan.block_q as u64 * 4).max(4);
        let rows_bytes = (rows.len() as u64 * 4).max(4);
        for (what, bytes) in [("max_storage_buffer_binding_size (MRA remainder rows)", rows_bytes), ("max_storage_buffer_binding_size (MRA remainder weights)", weights_bytes)] {
            if bytes > self.plan_limits.max_binding_bytes {
                return Err(Error::Limit { limit: what, required: bytes, available: self.plan_limits.max_binding_bytes });
            }
        }
        let contents: &[f32] = if rows.is_empty() { &[0.0] } else { rows };
        let rows = self.device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("sparse-attn mra rows"),
            contents: bytemuck::cast_slice(contents),
            usage: wgpu::BufferUsages::STORAGE,
        });
        let weights = self.buffer("sparse-attn mra weights", weights_bytes, wgpu::BufferUsages::STORAGE);
        for kind in Self::kinds(&prepared.plan, true) {
            self.kernel(kind, &prepared.plan)?;
        }
        prepared.mra = Some(MraBuffers { rows, weights });
        Ok(())
    }

    /// Validates, plans, compiles and uploads once; the result can be run many times
    /// (benchmarks) and read back.
    pub fn prepare_attention<'a>(
        &self,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        v: impl Into<ArrayView4<'a, f32>>,
        pattern: &BlockPattern,
        opts: &AttentionOptions,
    ) -> Result<PreparedAttention<'_>> {
        let (q, k, v) = (q.into(), k.into(), v.into());
        let shape = check_inputs(&q, &k, &v, opts)?;
        self.prepare_checked(q, k, v, shape, pattern, opts)
    }

    /// `prepare_attention` for inputs `check_inputs` has passed (maybe as part of larger
    /// tensors: a grouped call checks once, on the caller's whole tensors).
    fn prepare_checked(&self, q: ArrayView4<'_, f32>, k: ArrayView4<'_, f32>, v: ArrayView4<'_, f32>, shape: AttentionShape, pattern: &BlockPattern, opts: &AttentionOptions) -> Result<PreparedAttention<'_>> {
        let plan = self.plan(&shape, pattern, opts)?;
        self.prepare(&plan)?;
        let storage = wgpu::BufferUsages::STORAGE;
        let o_elems = (shape.slices() * shape.seq_q * shape.head_dim) as u64;
        let o_bytes = (o_elems * opts.dtype.bytes()).div_ceil(4) * 4;
        Ok(PreparedAttention {
            engine: self,
            q: self.upload("sparse-attn q", &q, opts.dtype, storage),
            k: self.upload("sparse-attn k", &k, opts.dtype, storage),
            v: self.upload("sparse-attn v", &v, opts.dtype, storage),
            o: self.buffer("sparse-attn o", o_bytes, storage | wgpu::BufferUsages::COPY_SRC),
            pattern: self.upload_pattern_in(pattern, plan.layout),
            workspace: self.create_workspace(&plan),
            plan,
            o_elems,
            o_bytes,
            mra: None,
        })
    }

    fn buffer(&self, label: &str, size: u64, usage: wgpu::BufferUsages) -> wgpu::Buffer {
        self.device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: size.max(4), usage, mapped_at_creation: false })
    }

    /// Maps a MAP_READ buffer and copies its bytes out (waits for the GPU).
    pub fn read_buffer<T: bytemuck::Pod>(&self, buffer: &wgpu::Buffer) -> Result<Vec<T>> {
        let (tx, rx) = std::sync::mpsc::channel();
        buffer.map_async(wgpu::MapMode::Read, .., move |r| {
            let _ = tx.send(r);
        });
        self.device.poll(wgpu::PollType::wait_indefinitely()).map_err(|e| Error::Gpu(format!("poll: {e}")))?;
        rx.recv()
            .map_err(|e| Error::Gpu(format!("map callback dropped: {e}")))?
            .map_err(|e| Error::Gpu(format!("map failed: {e}")))?;
        // Typed straight from the mapping (aligned to wgpu::MAP_ALIGNMENT): a Vec<u8> copy
        // carries no alignment for a later cast.
        let values = {
            let range = buffer.get_mapped_range(..).map_err(|e| Error::Gpu(format!("mapped range: {e}")))?;
            bytemuck::try_cast_slice::<u8, T>(&range).map_err(|e| Error::Gpu(format!("read back {:?}: {e}", buffer.size())))?.to_vec()
        };
        buffer.unmap();
        Ok(values)
    }

    /// Waits until all submitted work finished (for benchmarks).
    pub fn wait_idle(&self) -> Result<()> {
        self.device.poll(wgpu::PollType::wait_indefinitely()).map(|_| ()).map_err(|e| Error::Gpu(format!("poll: {e}")))
    }
}

/// Median of a sample (NaN when empty).
pub fn median(xs: &[f64]) -> f64 {
    let mut v = xs.to_vec();
    v.sort_by(|a, b| a.total_cmp(b));
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[n / 2],
        n => 0.5 * (v[n / 2 - 1] + v[n / 2]),
    }
}

/// Timings of repeated runs of a prepared call.
#[derive(Clone, Debug, Default, serde::Serialize)]
pub struct RunTimes {
    /// Wall-clock per run, submit to GPU idle, in ms.
    pub wall_ms: Vec<f64>,
    /// GPU time per run from timestamp queries (sum over passes), in ms; empty without them.
    pub gpu_ms: Vec<f64>,
    /// Median GPU ms per kernel kind over runs.
    pub stage_ms: std::collections::BTreeMap<String, f64>,
    /// GPU ms per kernel kind, one entry per run.
    pub stage_runs_ms: std::collections::BTreeMap<String, Vec<f64>>,
}

impl RunTimes {
    /// GPU median where timestamps exist, else the wall-clock median.
    pub fn median_ms(&self) -> f64 {
        if self.gpu_ms.is_empty() {
            median(&self.wall_ms)
        } else {
            median(&self.gpu_ms)
        }
    }
}

/// A call with its inputs uploaded, pipelines compiled and scratch allocated.
#[derive(Debug)]
pub struct PreparedAttention<'e> {
    engine: &'e Engine,
    plan: Plan,
    q: wgpu::Buffer,
    k: wgpu::Buffer,
    v: wgpu::Buffer,
    o: wgpu::Buffer,
    pattern: GpuPattern,
    workspace: Workspace,
    o_elems: u64,
    o_bytes: u64,
    mra: Option<MraBuffers>,
}

/// The MRA coarse remainder on the GPU: folded rows `[r, S, N…]` per query-block row
/// ([`crate::patterns::mra::MraRemainder::row_terms`]) and, for the three-kernel path, one
/// remainder weight per query row (written by the normaliser, read by the SpMM).
#[derive(Debug)]
pub struct MraBuffers {
    pub rows: wgpu::Buffer,
    pub weights: wgpu::Buffer,
}

impl PreparedAttention<'_> {
    pub fn plan(&self) -> &Plan {
        &self.plan
    }

    fn buffers(&self) -> AttentionBuffers<'_> {
        AttentionBuffers { q: &self.q, k: &self.k, v: &self.v, o: &self.o }
    }

    /// Runs `iters` times after `warmup` runs, waiting for the GPU after each run.
    pub fn time(&self, warmup: usize, iters: usize) -> Result<RunTimes> {
        let e = self.engine;
        // Three-kernel: 3 passes per chunk; fused: one per row class, or the kernel and its
        // split merge.
        let passes = (self.plan.chunks.len() * self.plan.row_classes.len().max(3)) as u32;
        let mut timer = super::timing::PassTimer::new(&e.device, &e.queue, passes);
        let mut times = RunTimes::default();
        let mut stages: std::collections::BTreeMap<String, Vec<f64>> = Default::default();
        let mut incomplete = false;
        for i in 0..warmup + iters {
            let mut encoder = e.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sparse-attn timed run") });
            e.encode_inner(&mut encoder, &self.plan, self.buffers(), &self.pattern, &self.workspace, None, timer.as_mut(), self.mra.as_ref())?;
            if let Some(t) = &timer {
                t.resolve(&mut encoder);
            }
            // The clock covers the GPU's work, not the validation and encoding in finish().
            let commands = encoder.finish();
            let t0 = std::time::Instant::now();
            e.queue.submit([commands]);
            e.wait_idle()?;
            let wall = t0.elapsed().as_secs_f64() * 1e3;
            let per_stage = match timer.as_mut() {
                Some(t) => t.read(e)?,
                None => Default::default(),
            };
            if i >= warmup {
                times.wall_ms.push(wall);
                // A run with an untimed pass (or timestamps out of order) makes every run
                // wall-clock: a partial sum would pass for the whole.
                incomplete |= timer.as_ref().is_some_and(|t| t.incomplete());
                if !per_stage.is_empty() {
                    times.gpu_ms.push(per_stage.values().sum::<f64>() / 1e6);
                    for (k, ns) in per_stage {
                        stages.entry(k.to_string()).or_default().push(ns / 1e6);
                    }
                }
            }
        }
        if incomplete {
            times.gpu_ms.clear();
            stages.clear();
        }
        times.stage_ms = stages.iter().map(|(k, v)| (k.clone(), median(v))).collect();
        times.stage_runs_ms = stages;
        Ok(times)
    }

    /// The fused entmax kernels' branch counts of the last run (`time` or `run_and_read`);
    /// `None` for other plans.
    pub fn entmax_paths(&self) -> Result<Option<EntmaxPaths>> {
        if self.plan.path != ExecPath::Fused || self.plan.normalizer == Normalizer::Softmax {
            return Ok(None);
        }
        let e = self.engine;
        let paths = &self.workspace.entmax_paths;
        let read = e.buffer("sparse-attn entmax path counts readback", paths.size(), wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ);
        let mut encoder = e.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sparse-attn entmax path counts") });
        encoder.copy_buffer_to_buffer(paths, 0, &read, 0, paths.size());
        e.queue.submit([encoder.finish()]);
        Ok(Some(EntmaxPaths::from_words(&e.read_buffer::<u32>(&read)?)))
    }

    /// Runs once and reads O back, and if asked the probabilities and row stats, which only
    /// three-kernel plans compute (a fused plan refuses them with `Unsupported`).
    pub fn run_and_read(&self, probabilities: bool, row_stats: bool) -> Result<AttentionOutput> {
        let e = self.engine;
        let plan = &self.plan;
        // The fused kernels write neither; reading the workspace would return its zeros.
        if plan.path == ExecPath::Fused && (probabilities || row_stats) {
            return Err(fused_has_no_outputs());
        }
        let shape = plan.shape;
        let tile_bytes = (plan.block_q * plan.block_k) as u64 * 4;
        let probability_bytes = plan.total_tiles * tile_bytes;
        let max_buffer = e.plan_limits.max_buffer_bytes;
        if probabilities && probability_bytes > max_buffer {
            return Err(Error::Limit { limit: "max_buffer_size (probabilities read back)", required: probability_bytes, available: max_buffer });
        }
        let probs = probabilities.then(|| {
            e.buffer("sparse-attn probabilities", (plan.total_tiles * tile_bytes).max(4), wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ)
        });
        let scope = super::kernels::ErrorScopes::push(&e.device);
        let mut encoder = e.device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sparse-attn attention") });
        e.encode_inner(&mut encoder, plan, self.buffers(), &self.pattern, &self.workspace, probs.as_ref(), None, self.mra.as_ref())?;
        let o_read = e.buffer("sparse-attn o readback", self.o_bytes, wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ);
        encoder.copy_buffer_to_buffer(&self.o, 0, &o_read, 0, self.o_bytes);
        let stats = &self.workspace.stats;
        let stats_read = row_stats.then(|| {
            let b = e.buffer("sparse-attn stats readback", stats.size(), wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ);
            encoder.copy_buffer_to_buffer(stats, 0, &b, 0, stats.size());
            b
        });
        e.queue.submit([encoder.finish()]);
        match scope.pop() {
            Some(err @ wgpu::Error::OutOfMemory { .. }) => return Err(Error::Gpu(format!("out of memory: {err}"))),
            Some(err) => return Err(Error::Gpu(err.to_string())),
            None => {}
        }
        let n = self.o_elems as usize;
        let short = || Error::Gpu(format!("output readback holds fewer than {n} values"));
        let o_flat: Vec<f32> = match plan.dtype {
            DType::F32 => e.read_buffer::<f32>(&o_read)?.get(..n).ok_or_else(short)?.to_vec(),
            DType::F16 => e.read_buffer::<half::f16>(&o_read)?.get(..n).ok_or_else(short)?.iter().map(|x| x.to_f32()).collect(),
        };
        let o = Array4::from_shape_vec((shape.batch, shape.heads, shape.seq_q, shape.head_dim), o_flat)
            .map_err(|err| Error::Gpu(format!("readback shape: {err}")))?;
        let probabilities = match probs {
            Some(b) => {
                let mut tiles: Vec<f32> = e.read_buffer(&b)?;
                tiles.truncate((plan.total_tiles * (plan.block_q * plan.block_k) as u64) as usize);
                Some(SparseProbabilities { block_q: plan.block_q, block_k: plan.block_k, tiles })
            }
            None => None,
        };
        let row_stats = match stats_read {
            Some(b) => {
                let words: Vec<u32> = e.read_buffer(&b)?;
                let padded = shape.seq_q.div_ceil(plan.block_q as usize) * plan.block_q as usize;
                let pick = |field: usize| {
                    Array3::from_shape_fn((shape.slices(), padded, 1), |(s, i, _)| words[2 * (s * padded + i) + field])
                        .slice_move(ndarray::s![.., ..shape.seq_q, 0])
                };
                Some(RowStats { support: pick(0), iterations: pick(1) })
            }
            None => None,
        };
        Ok(AttentionOutput { o, probabilities, row_stats, entmax_paths: self.entmax_paths()? })
    }
}

/// The fused kernels write neither probabilities nor row stats: the one refusal of the plan,
/// encode and read-back layers when asked for them.
fn fused_has_no_outputs() -> Error {
    Error::Unsupported(
        "the fused path does not materialise probabilities or row stats; use ExecPath::ThreeKernel (or Auto without a forced tile) and ask for them in the options".into(),
    )
}

#[cfg(test)]
mod tests {
    use super::EntmaxPaths;

    #[test]
    fn entmax_path_words_map_to_their_names() {
        // Word i (the shader's PATH_<NAMES[i]>) lands in the field named NAMES[i].
        let words: Vec<u32> = (10..10 + EntmaxPaths::NAMES.len() as u32).collect();
        let paths = EntmaxPaths::from_words(&words);
        assert_eq!(paths.counts().to_vec(), words);
        let json = serde_json::to_value(paths).expect("serialize");
        for (i, name) in EntmaxPaths::NAMES.iter().enumerate() {
            assert_eq!(json[name], words[i], "{name}");
        }
        assert_eq!(paths.tiles(), 10 + 11 + 12 + 13);
        assert!(paths.to_string().starts_with("cache_gathered=10;cache_staged=11;"), "{paths}");
    }
}
