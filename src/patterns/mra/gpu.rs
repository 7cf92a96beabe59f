//! The GPU low-resolution stage of MRA: `shaders/mra_lowres.wgsl`'s four entry points (block
//! means, low-resolution scores with row maxima, the per-slice selection, the remainder's row
//! terms), compiled once per engine in [`GpuMraLowRes::new`] (the engine keeps one, see
//! [`crate::Engine::mra_lowres`]). [`MraConfig::build_with_engine`] is the entry point; the CPU
//! [`MraConfig::build`] is its oracle.
//!
//! The work is split into chunks of consecutive query slices (with the kv slices they read) so
//! that every binding fits the engine's `plan_limits().max_binding_bytes` and every grid fits
//! `max_workgroups_per_dim` (2-D grids); only one slice that alone exceeds a limit is a typed
//! `Limit` error.

use super::{Mra, MraConfig, MraRemainder, SelectionRows, Setup};
use crate::error::{Error, Result};
use crate::{AttentionShape, Engine};
use ndarray::ArrayView4;
use wgpu::util::DeviceExt;

/// The WGSL source (for validation).
pub const SHADER: &str = include_str!("../../../shaders/mra_lowres.wgsl");

/// Invocations per workgroup of the means, scores and row-term passes.
const WG: u64 = 64;
/// Query-block rows per workgroup of the scores and row-term passes (the shader's `ROWS`).
const ROWS: u64 = 4;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    slices: u32,
    kv_slices: u32,
    slice_base: u32,
    kv_base: u32,
    heads: u32,
    kv_heads: u32,
    group: u32,
    head_dim: u32,
    seq_q: u32,
    seq_kv: u32,
    block: u32,
    q_blocks: u32,
    k_blocks: u32,
    diagonal_band: u32,
    first_block_prior: u32,
    want: u32,
    has_v: u32,
    scale: f32,
    k_means_off: u32,
    v_means_off: u32,
}

/// One chunk: query slices `s0..s1` and kv slices `kv0..kv1`.
#[derive(Clone, Copy, Debug)]
struct Chunk {
    s0: usize,
    s1: usize,
    kv0: usize,
    kv1: usize,
}

/// What one chunk reads back.
struct ChunkOut {
    means: Vec<f32>,
    logits: Vec<f32>,
    sel: Vec<u32>,
    rows: Vec<f32>,
}

/// Compiled pipelines of the MRA low-resolution stage on one engine's device.
#[derive(Debug)]
pub struct GpuMraLowRes {
    layout: wgpu::BindGroupLayout,
    means: wgpu::ComputePipeline,
    scores: wgpu::ComputePipeline,
    select: wgpu::ComputePipeline,
    rows: wgpu::ComputePipeline,
}

impl GpuMraLowRes {
    pub fn new(engine: &Engine) -> Result<Self> {
        use crate::gpu::kernels::{compile_module, Access::*};
        // params, then the storage buffers as mra_lowres.wgsl declares them
        let bindings = [Uniform, Read, Read, Read, ReadWrite, ReadWrite, ReadWrite, ReadWrite, ReadWrite];
        let (layout, pipelines) =
            compile_module(engine.device(), "sparse-attn mra lowres", SHADER, &bindings, &["block_means", "block_scores", "select_blocks", "row_terms"])?;
        let [means, scores, select, rows]: [wgpu::ComputePipeline; 4] =
            pipelines.try_into().map_err(|_| Error::Gpu("mra lowres: expected 4 pipelines".into()))?;
        Ok(Self { layout, means, scores, select, rows })
    }

    /// [`MraConfig::build_with_engine`] with these pipelines; `engine` must be the one this was
    /// created with.
    pub fn build(
        &self,
        engine: &Engine,
        config: &MraConfig,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        v: Option<&ArrayView4<f32>>,
        shape: &AttentionShape,
    ) -> Result<Mra> {
        let Setup { scale, geometry, qn, kn, counts, budget } = config.setup(q, k, v, shape)?;
        let mut sel_rows = SelectionRows::new(geometry, shape.slices() * qn)?;
        let d = shape.head_dim;
        // Priors are the same blocks in every slice: the GPU fills the rest of the budget.
        let taken = (0..qn).map(|i| (0..kn).filter(|&j| config.is_prior(i, j)).count()).sum::<usize>();
        let want = if taken < budget { (budget - taken).min(qn * kn - taken) } else { 0 };
        let want = u32::try_from(want).map_err(|_| Error::Shape("MRA budget past u32".into()))?;
        let (q, k) = (q.as_standard_layout(), k.as_standard_layout());
        let v = v.map(|v| v.as_standard_layout());
        let not_flat = || Error::Shape("MRA inputs are not contiguous after as_standard_layout".into());
        let (q_flat, k_flat) = (q.as_slice().ok_or_else(not_flat)?, k.as_slice().ok_or_else(not_flat)?);
        let v_flat = match &v {
            Some(v) => Some(v.as_slice().ok_or_else(not_flat)?),
            None => None,
        };
        let has_v = v_flat.is_some();

        let mut q_means = Vec::with_capacity(shape.slices() * qn * d);
        let mut k_means = Vec::with_capacity(shape.batch * shape.kv_heads * kn * d);
        let mut v_means = Vec::new();
        let mut rows_all = Vec::new();
        let mut kv_done = 0usize;
        for chunk in self.chunks(engine, shape, qn, kn, has_v)? {
            let out = self.run_chunk(engine, config, shape, chunk, (qn, kn), want, scale, q_flat, k_flat, v_flat)?;
            let cs = chunk.s1 - chunk.s0;
            let ckv = chunk.kv1 - chunk.kv0;
            let (q_len, kv_len) = (cs * qn * d, ckv * kn * d);
            let fresh = kv_done.max(chunk.kv0) - chunk.kv0; // kv slices already appended by the previous chunk
            let part = |from: usize| out.means.get(from + fresh * kn * d..from + kv_len).ok_or_else(|| Error::Gpu("mra lowres readback too short".into()));
            q_means.extend_from_slice(out.means.get(..q_len).ok_or_else(|| Error::Gpu("mra lowres readback too short".into()))?);
            k_means.extend_from_slice(part(q_len)?);
            if has_v {
                v_means.extend_from_slice(part(q_len + kv_len)?);
                rows_all.extend_from_slice(out.rows.get(..cs * qn * (d + 2)).ok_or_else(|| Error::Gpu("mra lowres row terms too short".into()))?);
            }
            kv_done = chunk.kv1;
            let (logits, sel) = (out.logits.get(..cs * qn * kn), out.sel.get(..cs * qn * kn));
            let (Some(logits), Some(sel)) = (logits, sel) else {
                return Err(Error::Gpu("mra lowres selection readback too short".into()));
            };
            for row in 0..cs * qn {
                let s = &sel[row * kn..(row + 1) * kn];
                sel_rows.push(&logits[row * kn..(row + 1) * kn], |j| s[j] != 0);
            }
        }
        let SelectionRows { acc, rest_ptr, rest_col, rest_logit } = sel_rows;
        let pattern = acc.finish()?;
        Ok(Mra {
            pattern,
            remainder: MraRemainder {
                block: config.block,
                shape: *shape,
                q_blocks: qn as u32,
                k_blocks: kn as u32,
                scale,
                q_means,
                k_means,
                v_means,
                counts,
                rest_ptr,
                rest_col,
                rest_logit,
                precomputed_rows: has_v.then_some(rows_all),
            },
            mode: config.mode,
        })
    }

    /// Bytes of the largest binding and the most workgroups of one dispatch for a chunk.
    fn chunk_need(shape: &AttentionShape, c: Chunk, qn: usize, kn: usize, has_v: bool) -> (u64, u64) {
        let (cs, ckv) = ((c.s1 - c.s0) as u64, (c.kv1 - c.kv0) as u64);
        let (n, m, d, qn, kn) = (shape.seq_q as u64, shape.seq_kv as u64, shape.head_dim as u64, qn as u64, kn as u64);
        let means = (cs * qn + ckv * kn * if has_v { 2 } else { 1 }) * d;
        let elems = [cs * n * d, ckv * m * d, means, cs * qn * kn, cs * qn * (d + 2)];
        let bytes = elems.into_iter().max().unwrap_or(0) * 4;
        let groups = [means.div_ceil(WG), cs * qn.div_ceil(ROWS), cs].into_iter().max().unwrap_or(0);
        (bytes, groups)
    }

    /// Greedy chunks of consecutive query slices under the engine's plan limits.
    fn chunks(&self, engine: &Engine, shape: &AttentionShape, qn: usize, kn: usize, has_v: bool) -> Result<Vec<Chunk>> {
        let limits = engine.plan_limits();
        let max_bytes = limits.max_binding_bytes.min(limits.max_buffer_bytes).min(u32::MAX as u64 * 4);
        let max_wg = limits.max_workgroups_per_dim.max(1) as u64;
        let chunk = |s0: usize, s1: usize| Chunk { s0, s1, kv0: shape.kv_slice(s0), kv1: shape.kv_slice(s1 - 1) + 1 };
        let mut out = Vec::new();
        let mut s0 = 0;
        while s0 < shape.slices() {
            let (bytes, groups) = Self::chunk_need(shape, chunk(s0, s0 + 1), qn, kn, has_v);
            if bytes > max_bytes {
                return Err(Error::Limit { limit: "max_storage_buffer_binding_size (MRA low-resolution stage: one slice)", required: bytes, available: max_bytes });
            }
            if groups > max_wg * max_wg {
                return Err(Error::Limit { limit: "max_compute_workgroups_per_dimension (MRA low-resolution stage: one slice)", required: groups.div_ceil(max_wg), available: max_wg });
            }
            let mut s1 = s0 + 1;
            while s1 < shape.slices() {
                let (bytes, groups) = Self::chunk_need(shape, chunk(s0, s1 + 1), qn, kn, has_v);
                if bytes > max_bytes || groups > max_wg * max_wg {
                    break;
                }
                s1 += 1;
            }
            out.push(chunk(s0, s1));
            s0 = s1;
        }
        Ok(out)
    }

    /// Uploads one chunk, runs the four passes and reads back means, scores, flags, row terms.
    #[allow(clippy::too_many_arguments)]
    fn run_chunk(
        &self,
        engine: &Engine,
        config: &MraConfig,
        shape: &AttentionShape,
        c: Chunk,
        (qn, kn): (usize, usize),
        want: u32,
        scale: f32,
        q: &[f32],
        k: &[f32],
        v: Option<&[f32]>,
    ) -> Result<ChunkOut> {
        let device = engine.device();
        let (n, m, d) = (shape.seq_q, shape.seq_kv, shape.head_dim);
        let (cs, ckv) = (c.s1 - c.s0, c.kv1 - c.kv0);
        let has_v = v.is_some();
        let too_short = || Error::Shape("MRA inputs shorter than their shape".into());
        let q_part = q.get(c.s0 * n * d..c.s1 * n * d).ok_or_else(too_short)?;
        let k_part = k.get(c.kv0 * m * d..c.kv1 * m * d).ok_or_else(too_short)?;
        let v_part = match v {
            Some(v) => v.get(c.kv0 * m * d..c.kv1 * m * d).ok_or_else(too_short)?,
            None => &[0.0f32],
        };
        let q_items = cs * qn * d;
        let kv_items = ckv * kn * d;
        let mean_items = q_items + kv_items * if has_v { 2 } else { 1 };
        let blocks = cs * qn * kn;
        let row_floats = if has_v { cs * qn * (d + 2) } else { 1 };
        // Every size below is bounded by the chunk's binding check (`chunks`), so u32 holds it.
        let u = |x: usize| x as u32;
        let params = Params {
            slices: u(cs),
            kv_slices: u(ckv),
            slice_base: u(c.s0),
            kv_base: u(c.kv0),
            heads: u(shape.heads),
            kv_heads: u(shape.kv_heads),
            group: u(shape.group()),
            head_dim: u(d),
            seq_q: u(n),
            seq_kv: u(m),
            block: config.block,
            q_blocks: u(qn),
            k_blocks: u(kn),
            diagonal_band: config.diagonal_band,
            first_block_prior: u32::from(config.first_block_prior),
            want,
            has_v: u32::from(has_v),
            scale,
            k_means_off: u(q_items),
            v_means_off: u(q_items + kv_items),
        };
        let scope = crate::gpu::kernels::ErrorScopes::push(device);
        let init = |label: &'static str, contents: &[u8], usage: wgpu::BufferUsages| device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents, usage });
        let empty = |label: &'static str, elems: usize, usage: wgpu::BufferUsages| {
            device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size: (elems.max(1) * 4) as u64, usage, mapped_at_creation: false })
        };
        let input = wgpu::BufferUsages::STORAGE;
        let rw = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let readback = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let params_buf = init("sparse-attn mra lowres params", bytemuck::bytes_of(&params), wgpu::BufferUsages::UNIFORM);
        let q_buf = init("sparse-attn mra lowres q", bytemuck::cast_slice(q_part), input);
        let k_buf = init("sparse-attn mra lowres k", bytemuck::cast_slice(k_part), input);
        let v_buf = init("sparse-attn mra lowres v", bytemuck::cast_slice(v_part), input);
        let means_buf = empty("sparse-attn mra lowres means", mean_items, rw);
        let logits_buf = empty("sparse-attn mra lowres scores", blocks, rw);
        let rowmax_buf = empty("sparse-attn mra lowres row maxima", cs * qn, input);
        let sel_buf = empty("sparse-attn mra lowres selection", blocks, rw);
        let rows_buf = empty("sparse-attn mra lowres row terms", row_floats, rw);
        let buffers = [&params_buf, &q_buf, &k_buf, &v_buf, &means_buf, &logits_buf, &rowmax_buf, &sel_buf, &rows_buf];
        let entries: Vec<wgpu::BindGroupEntry> = buffers.iter().enumerate().map(|(i, b)| wgpu::BindGroupEntry { binding: i as u32, resource: b.as_entire_binding() }).collect();
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor { label: Some("sparse-attn mra lowres bind group"), layout: &self.layout, entries: &entries });
        let max_wg = engine.plan_limits().max_workgroups_per_dim.max(1) as u64;
        let grid = |groups: u64| -> Result<(u32, u32)> {
            let gx = groups.clamp(1, max_wg);
            let gy = groups.div_ceil(gx).max(1);
            if gy > max_wg {
                return Err(Error::Limit { limit: "max_compute_workgroups_per_dimension", required: gy, available: max_wg });
            }
            Ok((gx as u32, gy as u32))
        };
        let row_groups = cs as u64 * (qn as u64).div_ceil(ROWS);
        let mut passes = vec![
            ("sparse-attn mra lowres means pass", &self.means, grid((mean_items as u64).div_ceil(WG))?),
            ("sparse-attn mra lowres scores pass", &self.scores, grid(row_groups)?),
            ("sparse-attn mra lowres select pass", &self.select, grid(cs as u64)?),
        ];
        if has_v {
            passes.push(("sparse-attn mra lowres row terms pass", &self.rows, grid(row_groups)?));
        }
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sparse-attn mra lowres encoder") });
        for (label, pipeline, (gx, gy)) in passes {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some(label), timestamp_writes: None });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        let means_read = empty("sparse-attn mra lowres means readback", mean_items, readback);
        let logits_read = empty("sparse-attn mra lowres scores readback", blocks, readback);
        let sel_read = empty("sparse-attn mra lowres selection readback", blocks, readback);
        let rows_read = empty("sparse-attn mra lowres row terms readback", row_floats, readback);
        for (from, to) in [(&means_buf, &means_read), (&logits_buf, &logits_read), (&sel_buf, &sel_read), (&rows_buf, &rows_read)] {
            encoder.copy_buffer_to_buffer(from, 0, to, 0, from.size());
        }
        engine.queue().submit([encoder.finish()]);
        if let Some(e) = scope.pop() {
            return Err(Error::Gpu(format!("mra lowres dispatch: {e}")));
        }
        Ok(ChunkOut {
            means: engine.read_buffer(&means_read)?,
            logits: engine.read_buffer(&logits_read)?,
            sel: engine.read_buffer(&sel_read)?,
            rows: engine.read_buffer(&rows_read)?,
        })
    }
}
