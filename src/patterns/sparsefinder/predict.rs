//! Prediction: project Q/K, then emit the predicted pairs one query-block row at a time
//! (memory O(nnz) plus O(n·r) for the projections and the bucket/cluster index).

use super::model::{HeadModel, SparsefinderModel};
use super::{SparsefinderConfig, Variant};
use crate::error::{Error, Result};
use crate::pattern::{BlockPattern, PatternGeometry, FULL};
use crate::patterns::DEFAULT_BLOCK;
use crate::shape::check_finite;
use crate::AttentionShape;
use ndarray::{Array2, ArrayView2, ArrayView4, Axis};

/// What to predict and at which block size; pass to [`SparsefinderModel::build`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Sparsefinder {
    pub variant: Variant,
    pub block_q: u32,
    pub block_k: u32,
}

impl Sparsefinder {
    /// Blocks of [`DEFAULT_BLOCK`].
    pub fn new(variant: Variant) -> Self {
        Self { variant, block_q: DEFAULT_BLOCK, block_k: DEFAULT_BLOCK }
    }
    pub fn with_blocks(mut self, block_q: u32, block_k: u32) -> Self {
        (self.block_q, self.block_k) = (block_q, block_k);
        self
    }
}

/// Projected queries and keys of one layer: `q[s]` is `[seq_q, rank]` and `k[s]` is
/// `[seq_kv, rank]` for query slice `s = b·heads + h` (keys projected with head `h`'s `W_k`,
/// so GQA kv heads appear once per query head). Produced by [`SparsefinderModel::project`] on
/// the CPU, or by any other implementation of the same linear maps.
#[derive(Clone, Debug, PartialEq)]
pub struct Projected {
    pub shape: AttentionShape,
    pub q: Vec<Array2<f32>>,
    pub k: Vec<Array2<f32>>,
}

/// `x·W + b` for `x` `[n, d]`, `w` `d × rank` row-major, `b` `[rank]`: the CPU projection.
pub fn project_rows(x: &ArrayView2<f32>, w: &[f32], b: &[f32], rank: usize) -> Result<Array2<f32>> {
    let d = x.ncols();
    if w.len() != d * rank || b.len() != rank {
        return Err(Error::Shape(format!(
            "projection of {d}-dim rows to rank {rank} needs a {d}x{rank} matrix and {rank} biases, got {} and {}",
            w.len(),
            b.len()
        )));
    }
    let mut out = Array2::<f32>::zeros((x.nrows(), rank));
    for (row, mut o) in x.outer_iter().zip(out.outer_iter_mut()) {
        let mut acc: Vec<f32> = b.to_vec();
        for (a, &xa) in row.iter().enumerate() {
            for (c, slot) in acc.iter_mut().enumerate() {
                *slot += xa * w[a * rank + c];
            }
        }
        for (dst, v) in o.iter_mut().zip(acc) {
            *dst = v;
        }
    }
    Ok(out)
}

/// Squared distance of two projected rows.
#[inline]
pub(crate) fn dist2(a: &[f32], b: &[f32]) -> f32 {
    a.iter().zip(b).map(|(x, y)| (x - y) * (x - y)).sum()
}

/// Contiguous rows of a standard-layout `[n, r]` array (projections are always built so).
pub(crate) fn rows_of(a: &Array2<f32>) -> Vec<&[f32]> {
    let r = a.ncols().max(1);
    match a.as_slice() {
        Some(s) => s.chunks_exact(r).collect(),
        None => Vec::new(),
    }
}

/// The window / global-token pairs every predicted pattern holds.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Structure {
    pub window: u32,
    pub first: u32,
    pub last: u32,
    pub global_queries: bool,
    pub causal: bool,
    pub seq_q: u32,
    pub seq_kv: u32,
}

impl Structure {
    pub fn new(config: &SparsefinderConfig, seq_q: usize, seq_kv: usize) -> Self {
        Self {
            window: config.window,
            first: config.first,
            last: config.last,
            global_queries: config.global_queries,
            causal: config.causal,
            seq_q: seq_q as u32,
            seq_kv: seq_kv as u32,
        }
    }

    fn offset(&self) -> i64 {
        self.seq_kv as i64 - self.seq_q as i64
    }

    /// Largest key query `i` may see (causal), as an exclusive bound.
    pub fn key_end(&self, i: u32) -> u32 {
        if self.causal {
            (i as i64 + self.offset() + 1).clamp(0, self.seq_kv as i64) as u32
        } else {
            self.seq_kv
        }
    }

    /// Whether query `i` is a global query (sees every key).
    pub fn global_query(&self, i: u32) -> bool {
        self.global_queries && (i < self.first || i as u64 + self.last as u64 >= self.seq_q as u64)
    }

    /// Whether the pair is in the window or hits a global token (exactly as `Window` ∪
    /// `GlobalTokens` with the same settings, restricted to causal pairs when causal).
    pub fn covers(&self, i: u32, j: u32) -> bool {
        if j >= self.key_end(i) {
            return false;
        }
        if self.global_query(i) || j < self.first || j as u64 + self.last as u64 >= self.seq_kv as u64 {
            return true;
        }
        let d = j as i64 - (i as i64 + self.offset());
        let w = self.window as i64;
        let (lo, hi) = if self.causal { (-(w - 1), 0) } else { (-((w - 1) / 2), w / 2) };
        d >= lo && d <= hi
    }

    /// Emits the structural keys of query `i` (may repeat keys).
    pub fn emit(&self, i: u32, emit: &mut impl FnMut(u32)) {
        let end = self.key_end(i);
        if self.global_query(i) {
            (0..end).for_each(&mut *emit);
            return;
        }
        (0..self.first.min(end)).for_each(&mut *emit);
        (self.seq_kv.saturating_sub(self.last)..end).for_each(&mut *emit);
        let w = self.window as i64;
        let (lo, hi) = if self.causal { (-(w - 1), 0) } else { (-((w - 1) / 2), w / 2) };
        let centre = i as i64 + self.offset();
        let (a, b) = ((centre + lo).max(0), (centre + hi + 1).min(end as i64));
        if a < b {
            (a as u32..b as u32).for_each(emit);
        }
    }
}

/// The bits of one query-block row, keyed by key block, in one reused arena; flushed straight
/// into the pattern's CSR arrays (no per-block allocation). O(touched blocks) per row.
struct RowBits {
    g: PatternGeometry,
    wpr: usize,
    words: usize,
    /// Local index of each key block in this row, `u32::MAX` when untouched.
    slot: Vec<u32>,
    /// Touched key blocks, in touch order.
    blocks: Vec<u32>,
    arena: Vec<u32>,
}

/// The pattern under construction, in `BlockPattern`'s CSR layout.
#[derive(Default)]
struct Csr {
    row_ptr: Vec<u32>,
    col_idx: Vec<u32>,
    mask_of: Vec<u32>,
    masks: Vec<u32>,
}

impl RowBits {
    fn new(g: &PatternGeometry) -> Self {
        Self {
            g: *g,
            wpr: g.block_k.div_ceil(32) as usize,
            words: g.mask_words(),
            slot: vec![u32::MAX; g.k_blocks() as usize],
            blocks: Vec::new(),
            arena: Vec::new(),
        }
    }

    #[inline]
    fn set(&mut self, r: u32, j: u32) {
        let (kb, c) = (j / self.g.block_k, j % self.g.block_k);
        let s = &mut self.slot[kb as usize];
        if *s == u32::MAX {
            *s = self.blocks.len() as u32;
            self.blocks.push(kb);
            self.arena.resize(self.arena.len() + self.words, 0);
        }
        self.arena[*s as usize * self.words + r as usize * self.wpr + (c / 32) as usize] |= 1 << (c % 32);
    }

    /// ORs `bits` (bit `t` = key `j0 + t`) into row `r`; `j0` is a multiple of
    /// `chunk()`, so the bits land in one mask word.
    #[inline]
    fn or_bits(&mut self, r: u32, j0: u32, bits: u32) {
        if bits == 0 {
            return;
        }
        let (kb, c0) = (j0 / self.g.block_k, j0 % self.g.block_k);
        let s = &mut self.slot[kb as usize];
        if *s == u32::MAX {
            *s = self.blocks.len() as u32;
            self.blocks.push(kb);
            self.arena.resize(self.arena.len() + self.words, 0);
        }
        self.arena[*s as usize * self.words + r as usize * self.wpr + (c0 / 32) as usize] |= bits << (c0 % 32);
    }

    /// Keys per `or_bits` chunk: one mask word, never across a key block.
    fn chunk(&self) -> u32 {
        self.g.block_k.min(32)
    }

    /// Whether every in-range element of block (qb, kb) is set (then it is stored `FULL`).
    fn is_full(&self, bits: &[u32], qb: u32, kb: u32) -> bool {
        let rows = (self.g.seq_q - qb * self.g.block_q).min(self.g.block_q) as usize;
        let cols = (self.g.seq_kv - kb * self.g.block_k).min(self.g.block_k) as usize;
        (0..rows).all(|r| {
            (0..self.wpr).all(|w| {
                let n = cols.saturating_sub(32 * w).min(32);
                let want = if n == 32 { u32::MAX } else { (1u32 << n) - 1 };
                bits[r * self.wpr + w] & want == want
            })
        })
    }

    /// Appends this row (query block `qb`) to `out` in key-block order and resets the buffer.
    fn flush(&mut self, qb: u32, out: &mut Csr) {
        let mut order: Vec<(u32, usize)> = self.blocks.iter().enumerate().map(|(i, &kb)| (kb, i)).collect();
        order.sort_unstable();
        for (kb, i) in order {
            let bits = &self.arena[i * self.words..(i + 1) * self.words];
            out.col_idx.push(kb);
            if self.is_full(bits, qb, kb) {
                out.mask_of.push(FULL);
            } else {
                out.mask_of.push(out.masks.len() as u32);
                out.masks.extend_from_slice(bits);
            }
            self.slot[kb as usize] = u32::MAX;
        }
        out.row_ptr.push(out.col_idx.len() as u32);
        self.blocks.clear();
        self.arena.clear();
    }
}

/// CSR lists: members of each group.
struct Groups {
    start: Vec<u32>,
    members: Vec<u32>,
}

impl Groups {
    fn new(groups: usize, of: &[u32]) -> Self {
        let mut start = vec![0u32; groups + 1];
        for &g in of {
            start[g as usize + 1] += 1;
        }
        for g in 0..groups {
            start[g + 1] += start[g];
        }
        let mut fill = start.clone();
        let mut members = vec![0u32; of.len()];
        for (j, &g) in of.iter().enumerate() {
            members[fill[g as usize] as usize] = j as u32;
            fill[g as usize] += 1;
        }
        Self { start, members }
    }
    fn of(&self, g: u32) -> &[u32] {
        &self.members[self.start[g as usize] as usize..self.start[g as usize + 1] as usize]
    }
}

/// Per-slice index for one variant.
enum Prepared<'a> {
    Distance { q: Vec<&'a [f32]>, k: &'a [f32], rank: usize, t: f32 },
    /// Per coordinate: bucket of each query, keys of each bucket.
    Buckets { q_bucket: Vec<Vec<u32>>, keys: Vec<Groups> },
    /// Clusters of each query (`top` per query), keys of each cluster.
    Clusters { q_clusters: Vec<u32>, top: usize, keys: Groups },
}

/// Buckets of one coordinate: the keys are sorted by value and cut every `bucket_size` keys
/// (equal-size key buckets; ties broken by position), and each query joins the bucket its value
/// falls in, using the keys' bucket bounds (the paper code's `enforce_same_bounds`: bounds taken
/// from the keys keep queries and keys value-aligned). Returns (bucket of each query, bucket of
/// each key, bucket count).
pub(crate) fn coordinate_buckets(qv: &[f32], kv: &[f32], bucket_size: usize) -> (Vec<u32>, Vec<u32>, usize) {
    let mut order: Vec<u32> = (0..kv.len() as u32).collect();
    order.sort_unstable_by(|&a, &b| kv[a as usize].total_cmp(&kv[b as usize]).then(a.cmp(&b)));
    let mut key_bucket = vec![0u32; kv.len()];
    for (rank, &j) in order.iter().enumerate() {
        key_bucket[j as usize] = (rank / bucket_size) as u32;
    }
    let sorted: Vec<f32> = order.iter().map(|&j| kv[j as usize]).collect();
    let last = kv.len().saturating_sub(1);
    let query_bucket = qv
        .iter()
        .map(|&v| {
            let below = sorted.partition_point(|&x| x.total_cmp(&v).is_lt());
            (below.min(last) / bucket_size) as u32
        })
        .collect();
    (query_bucket, key_bucket, kv.len().div_ceil(bucket_size).max(1))
}

/// The `top` nearest centroids of a point, nearest first (ties to the lower index).
pub(crate) fn top_clusters(p: &[f32], centroids: &[f32], rank: usize, top: usize) -> Vec<u32> {
    let mut d: Vec<(f32, u32)> = centroids.chunks_exact(rank).enumerate().map(|(c, m)| (dist2(p, m), c as u32)).collect();
    d.sort_unstable_by(|a, b| a.0.total_cmp(&b.0).then(a.1.cmp(&b.1)));
    d.into_iter().take(top).map(|(_, c)| c).collect()
}

impl<'a> Prepared<'a> {
    fn new(head: &HeadModel, rank: usize, qp: &'a Array2<f32>, kp: &'a Array2<f32>, variant: &Variant) -> Result<Self> {
        let (q, k) = (rows_of(qp), rows_of(kp));
        if q.len() != qp.nrows() || k.len() != kp.nrows() {
            return Err(Error::Shape(format!("projections must be standard-layout [n, {rank}] arrays")));
        }
        Ok(match *variant {
            Variant::Distance { threshold } => {
                let t = head.distance_threshold(threshold)? as f32;
                let k = kp.as_slice().ok_or_else(|| Error::Shape("key projections must be standard-layout".into()))?;
                Prepared::Distance { q, k, rank, t }
            }
            Variant::Quantization { bucket_size } => {
                let mut q_bucket = Vec::with_capacity(rank);
                let mut keys = Vec::with_capacity(rank);
                for c in 0..rank {
                    let qv: Vec<f32> = q.iter().map(|row| row[c]).collect();
                    let kv: Vec<f32> = k.iter().map(|row| row[c]).collect();
                    let (qb, kb, n) = coordinate_buckets(&qv, &kv, bucket_size);
                    q_bucket.push(qb);
                    keys.push(Groups::new(n, &kb));
                }
                Prepared::Buckets { q_bucket, keys }
            }
            Variant::Clustering { clusters, query_top } => {
                let cents = &head.centroids(clusters)?.centroids;
                let key_cluster: Vec<u32> = k.iter().map(|row| top_clusters(row, cents, rank, 1)[0]).collect();
                let mut q_clusters = Vec::with_capacity(q.len() * query_top);
                for row in &q {
                    q_clusters.extend(top_clusters(row, cents, rank, query_top));
                }
                Prepared::Clusters { q_clusters, top: query_top, keys: Groups::new(clusters, &key_cluster) }
            }
        })
    }

    /// Sets the predicted keys of query `i` (row `r` of its block) below `end` in `row`.
    fn emit(&self, i: u32, r: u32, end: u32, row: &mut RowBits) {
        match self {
            Prepared::Distance { q, k, rank, t } => {
                // One mask word at a time: `chunk` branch-free comparisons, then one OR.
                let (qi, t, rank) = (q[i as usize], *t, *rank);
                let chunk = row.chunk();
                let mut j0 = 0u32;
                while j0 < end {
                    let j1 = (j0 + chunk).min(end);
                    let keys = &k[j0 as usize * rank..j1 as usize * rank];
                    let mut bits = 0u32;
                    if let &[a, b, c, d] = qi {
                        // r = 4 (the paper's): unrolled.
                        for (bit, kj) in keys.chunks_exact(4).enumerate() {
                            let (x, y, z, w) = (a - kj[0], b - kj[1], c - kj[2], d - kj[3]);
                            bits |= ((x * x + y * y + z * z + w * w <= t) as u32) << bit;
                        }
                    } else {
                        for (bit, kj) in keys.chunks_exact(rank).enumerate() {
                            bits |= ((dist2(qi, kj) <= t) as u32) << bit;
                        }
                    }
                    row.or_bits(r, j0, bits);
                    j0 = j1;
                }
            }
            Prepared::Buckets { q_bucket, keys } => {
                for (qb, groups) in q_bucket.iter().zip(keys) {
                    for &j in groups.of(qb[i as usize]) {
                        if j < end {
                            row.set(r, j);
                        }
                    }
                }
            }
            Prepared::Clusters { q_clusters, top, keys } => {
                for &c in &q_clusters[i as usize * top..(i as usize + 1) * top] {
                    for &j in keys.of(c) {
                        if j < end {
                            row.set(r, j);
                        }
                    }
                }
            }
        }
    }
}

impl SparsefinderModel {
    /// Projects one layer's Q `[batch, heads, seq_q, head_dim]` and K
    /// `[batch, kv_heads, seq_kv, head_dim]` for `variant` (the quantization variant has its own
    /// projection) with the CPU ([`project_rows`]). Checks the layer, heads and head_dim against
    /// the model ([`Error::Shape`]) and that the inputs are finite.
    pub fn project<'a>(
        &self,
        layer: usize,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        variant: &Variant,
    ) -> Result<Projected> {
        let (q, k) = (q.into(), k.into());
        let shape = self.input_shape(layer, &q, &k)?;
        check_finite("q", &q)?;
        check_finite("k", &k)?;
        let mut pq = Vec::with_capacity(shape.slices());
        let mut pk = Vec::with_capacity(shape.slices());
        for s in 0..shape.slices() {
            let (b, h) = (s / shape.heads, s % shape.heads);
            let kvh = h / shape.group();
            let p = self.head(layer, h)?.projection(variant);
            let qs = q.index_axis(Axis(0), b).index_axis_move(Axis(0), h);
            let ks = k.index_axis(Axis(0), b).index_axis_move(Axis(0), kvh);
            pq.push(project_rows(&qs, &p.w_q, &p.b_q, self.rank)?);
            pk.push(project_rows(&ks, &p.w_k, &p.b_k, self.rank)?);
        }
        Ok(Projected { shape, q: pq, k: pk })
    }

    /// The problem shape of (q, k), checked against the model.
    fn input_shape(&self, layer: usize, q: &ArrayView4<f32>, k: &ArrayView4<f32>) -> Result<AttentionShape> {
        let (qs, ks) = (q.shape(), k.shape());
        if qs[0] != ks[0] {
            return Err(Error::Shape(format!("Q batch {} != K batch {}", qs[0], ks[0])));
        }
        if qs[3] != ks[3] {
            return Err(Error::Shape(format!("Q head_dim {} != K head_dim {}", qs[3], ks[3])));
        }
        let shape = AttentionShape { batch: qs[0], heads: qs[1], kv_heads: ks[1], seq_q: qs[2], seq_kv: ks[2], head_dim: qs[3] };
        shape.validate()?;
        self.check_input(layer, shape.heads, shape.head_dim)?;
        Ok(shape)
    }

    /// Predicts the pattern of one layer: one pattern slice per (batch, head), the variant's pairs
    /// plus the window and global tokens, element masks on partial blocks.
    pub fn build<'a>(
        &self,
        layer: usize,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        spec: &Sparsefinder,
    ) -> Result<BlockPattern> {
        spec.variant.validate()?;
        let projected = self.project(layer, q, k, &spec.variant)?;
        self.build_projected(layer, &projected, spec)
    }

    /// [`Self::build`] from projections computed elsewhere (e.g. on the GPU), with the projection
    /// [`HeadModel::projection`] gives for the variant.
    pub fn build_projected(&self, layer: usize, projected: &Projected, spec: &Sparsefinder) -> Result<BlockPattern> {
        spec.variant.validate()?;
        let shape = projected.shape;
        shape.validate()?;
        self.check_input(layer, shape.heads, shape.head_dim)?;
        let slices = shape.slices();
        if projected.q.len() != slices || projected.k.len() != slices {
            return Err(Error::Shape(format!(
                "projections hold {} query and {} key slices, the shape has batch*heads = {slices}",
                projected.q.len(),
                projected.k.len()
            )));
        }
        for (s, (pq, pk)) in projected.q.iter().zip(&projected.k).enumerate() {
            if pq.dim() != (shape.seq_q, self.rank) || pk.dim() != (shape.seq_kv, self.rank) {
                return Err(Error::Shape(format!(
                    "slice {s}: projections are {:?} and {:?}, expected [{}, {r}] and [{}, {r}]",
                    pq.dim(),
                    pk.dim(),
                    shape.seq_q,
                    shape.seq_kv,
                    r = self.rank
                )));
            }
        }
        // NaN distances would compare false everywhere: a silently empty or full pattern.
        crate::shape::check_finite_values("projected q", projected.q.iter().flatten())?;
        crate::shape::check_finite_values("projected k", projected.k.iter().flatten())?;
        let g = PatternGeometry {
            block_q: spec.block_q,
            block_k: spec.block_k,
            seq_q: shape.seq_q as u32,
            seq_kv: shape.seq_kv as u32,
            slices: slices as u32,
        };
        g.validate()?;
        let mut out = Csr { row_ptr: vec![0], ..Csr::default() };
        let structure = Structure::new(&self.config, shape.seq_q, shape.seq_kv);
        let mut row = RowBits::new(&g);
        for s in 0..slices {
            let head = self.head(layer, s % shape.heads)?;
            let prepared = Prepared::new(head, self.rank, &projected.q[s], &projected.k[s], &spec.variant)?;
            for qb in 0..g.q_blocks() {
                let first = qb * g.block_q;
                for i in first..(first + g.block_q).min(g.seq_q) {
                    let r = i - first;
                    structure.emit(i, &mut |j: u32| row.set(r, j));
                    if !structure.global_query(i) {
                        prepared.emit(i, r, structure.key_end(i), &mut row);
                    }
                }
                row.flush(qb, &mut out);
            }
        }
        Ok(BlockPattern::new_checked(g, out.row_ptr, out.col_idx, out.mask_of, out.masks)?)
    }
}
