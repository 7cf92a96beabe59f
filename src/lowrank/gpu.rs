//! The GPU path of low-rank attention: `lowrank.wgsl`'s three entry points (subset scores,
//! reconstruction, normalisation + P·V), compiled once per engine in [`GpuLowRank::new`].

use super::LowRankPlan;
use crate::error::{Error, Result};
use crate::{Engine, Normalizer};
use ndarray::{Array4, ArrayView4};
use wgpu::util::DeviceExt;

/// The WGSL source (for validation).
pub const SHADER: &str = include_str!("lowrank.wgsl");

/// Largest rank the kernel holds in workgroup memory.
pub const MAX_GPU_RANK: usize = 128;
/// Bisection steps of the entmax threshold search.
const ENTMAX_ITERS: u32 = 40;
const NO_SLOT: u32 = u32::MAX;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    rows: u32,
    seq_q: u32,
    heads: u32,
    kv_heads: u32,
    group: u32,
    n: u32,
    d: u32,
    m: u32,
    r: u32,
    kind: u32,
    iters: u32,
    pad0: u32,
    alpha: f32,
    scale: f32,
    pad1: u32,
    pad2: u32,
    q_off: u32,
    k_off: u32,
    v_off: u32,
    mu_off: u32,
    u_off: u32,
    a_off: u32,
    pad3: u32,
    pad4: u32,
}

/// Output of [`GpuLowRank::attention`]: `o` `[batch, heads, seq_q, head_dim]` and, when asked
/// for, the reconstructed scores `[batch, heads, seq_q, seq_kv]` (before normalisation).
#[derive(Clone, Debug)]
pub struct LowRankOutput {
    pub o: Array4<f32>,
    pub scores: Option<Array4<f32>>,
}

/// Compiled pipelines of the low-rank kernels on one engine's device.
#[derive(Debug)]
pub struct GpuLowRank {
    layout: wgpu::BindGroupLayout,
    subset: wgpu::ComputePipeline,
    reconstruct: wgpu::ComputePipeline,
    normalize: wgpu::ComputePipeline,
}

impl GpuLowRank {
    pub fn new(engine: &Engine) -> Result<Self> {
        use crate::gpu::kernels::{compile_module, Access::*};
        // params, then the storage buffers as lowrank.wgsl declares them
        let bindings = [Uniform, Read, Read, ReadWrite, ReadWrite, ReadWrite];
        let (layout, pipelines) = compile_module(engine.device(), "sparse-attn lowrank", SHADER, &bindings, &["subset_scores", "reconstruct", "normalize_pv"])?;
        let [subset, reconstruct, normalize]: [wgpu::ComputePipeline; 3] =
            pipelines.try_into().map_err(|_| Error::Gpu("lowrank: expected 3 pipelines".into()))?;
        Ok(Self { layout, subset, reconstruct, normalize })
    }

    /// Low-rank attention on the GPU; same inputs and result as [`super::attention`] (f32).
    /// `with_scores` also reads back the reconstructed scores. `engine` must be the one this was
    /// created with.
    ///
    /// Work past one binding (the engine's `plan_limits().max_binding_bytes`) is split into
    /// chunks of query rows, then of batch items; only a single batch item whose K/V (plus the
    /// basis) alone exceed a binding is a `Limit` error.
    #[allow(clippy::too_many_arguments)]
    pub fn attention(
        &self,
        engine: &Engine,
        plan: &LowRankPlan,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        v: &ArrayView4<f32>,
        normalizer: Normalizer,
        with_scores: bool,
    ) -> Result<LowRankOutput> {
        normalizer.validate()?;
        let shape = plan.check_shape(q, k, v)?;
        let max = engine.plan_limits().max_binding_bytes.min(engine.device().limits().max_buffer_size);
        let (n, m, d) = (plan.length as u64, plan.subset.len() as u64, shape.head_dim as u64);
        let slices = shape.slices() as u64;
        let fixed = (k.len() + v.len() + plan.mean.len() + plan.basis.len() + plan.operator.len()) as u64;
        // Largest binding of a call with `rows` query rows per slice.
        let need = |rows: u64| {
            let per = slices * rows;
            [fixed + per * d, per * n, per * m, per * d].into_iter().max().unwrap_or(0) * 4
        };
        if need(shape.seq_q as u64) <= max {
            return self.attention_once(engine, plan, q, k, v, normalizer, with_scores);
        }
        let axis = ndarray::Axis(0);
        if shape.batch > 1 && fixed * 4 > max / 2 {
            // K/V dominate: split the batch first.
            return self.concat(engine, plan, q, k, v, normalizer, with_scores, axis, 1);
        }
        let mut rows = shape.seq_q as u64;
        while rows > 1 && need(rows) > max {
            rows = rows.div_ceil(2);
        }
        if need(rows) > max {
            if shape.batch > 1 {
                return self.concat(engine, plan, q, k, v, normalizer, with_scores, axis, 1);
            }
            return Err(Error::Limit {
                limit: "max_storage_buffer_binding_size (lowrank: one query row with its K/V and basis)",
                required: need(1),
                available: max,
            });
        }
        self.concat(engine, plan, q, k, v, normalizer, with_scores, ndarray::Axis(2), rows as usize)
    }

    /// Runs `attention` on chunks of `step` along `axis` (0: batch, with its K/V; 2: query rows,
    /// full K/V) and concatenates the results.
    #[allow(clippy::too_many_arguments)]
    fn concat(
        &self,
        engine: &Engine,
        plan: &LowRankPlan,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        v: &ArrayView4<f32>,
        normalizer: Normalizer,
        with_scores: bool,
        axis: ndarray::Axis,
        step: usize,
    ) -> Result<LowRankOutput> {
        let len = q.len_of(axis);
        let mut outs = Vec::new();
        for start in (0..len).step_by(step.max(1)) {
            let range = ndarray::Slice::from(start..(start + step).min(len));
            let qc = q.slice_axis(axis, range);
            let (kc, vc) = if axis.index() == 0 { (k.slice_axis(axis, range), v.slice_axis(axis, range)) } else { (k.view(), v.view()) };
            outs.push(self.attention(engine, plan, &qc, &kc, &vc, normalizer, with_scores)?);
        }
        let join = |parts: Vec<ndarray::ArrayView4<f32>>| {
            ndarray::concatenate(axis, &parts).map_err(|e| Error::Shape(format!("lowrank chunks: {e}")))
        };
        let o = join(outs.iter().map(|x| x.o.view()).collect())?;
        let scores = match with_scores {
            true => Some(join(outs.iter().filter_map(|x| x.scores.as_ref().map(|s| s.view())).collect())?),
            false => None,
        };
        Ok(LowRankOutput { o, scores })
    }

    /// One call whose bindings fit.
    #[allow(clippy::too_many_arguments)]
    fn attention_once(
        &self,
        engine: &Engine,
        plan: &LowRankPlan,
        q: &ArrayView4<f32>,
        k: &ArrayView4<f32>,
        v: &ArrayView4<f32>,
        normalizer: Normalizer,
        with_scores: bool,
    ) -> Result<LowRankOutput> {
        let shape = plan.check_shape(q, k, v)?;
        let (n, m, r, d) = (plan.length, plan.subset.len(), plan.rank, shape.head_dim);
        if r > MAX_GPU_RANK {
            return Err(Error::Unsupported(format!(
                "lowrank GPU rank {r} exceeds {MAX_GPU_RANK}"
            )));
        }
        let rows = shape.slices() * shape.seq_q;
        // Pack q, k, v, μ, U, A into one f32 buffer.
        let mut data: Vec<f32> = Vec::new();
        let mut push = |xs: &mut dyn Iterator<Item = f32>| {
            let off = data.len();
            data.extend(xs);
            off
        };
        let q_off = push(&mut q.iter().copied());
        let k_off = push(&mut k.iter().copied());
        let v_off = push(&mut v.iter().copied());
        let mu_off = push(&mut plan.mean.iter().map(|&x| x as f32));
        let u_off = push(&mut plan.basis.iter().map(|&x| x as f32));
        let a_off = push(&mut plan.operator.iter().map(|&x| x as f32));
        let mut index: Vec<u32> = plan.subset.iter().map(|&j| j as u32).collect();
        index.resize(m + n, NO_SLOT);
        for (p, &j) in plan.subset.iter().enumerate() {
            index[m + j] = p as u32;
        }
        let device = engine.device();
        let limits = device.limits();
        let max = engine.plan_limits().max_binding_bytes.min(limits.max_buffer_size);
        let score_elems = rows as u64 * n as u64;
        for (what, elems) in [
            ("packed inputs", data.len() as u64),
            ("scores", score_elems),
            ("subset scores", rows as u64 * m as u64),
            ("output", rows as u64 * d as u64),
        ] {
            if elems * 4 > max {
                return Err(Error::Limit {
                    limit: "max_storage_buffer_binding_size",
                    required: elems * 4,
                    available: max,
                });
            }
            if elems > u32::MAX as u64 {
                return Err(Error::Shape(format!(
                    "lowrank GPU: {what} has {elems} elements, past u32 indexing"
                )));
            }
        }
        let u32s = |x: usize| x as u32; // every size is bounded by the element counts checked above
        let (kind, alpha) = match normalizer.alpha() {
            None => (0u32, 1.0f32),
            Some(a) => (1u32, a as f32),
        };
        let params = Params {
            rows: u32s(rows),
            seq_q: u32s(shape.seq_q),
            heads: u32s(shape.heads),
            kv_heads: u32s(shape.kv_heads),
            group: u32s(shape.group()),
            n: u32s(n),
            d: u32s(d),
            m: u32s(m),
            r: u32s(r),
            kind,
            iters: ENTMAX_ITERS,
            pad0: 0,
            alpha,
            scale: shape.default_scale(),
            pad1: 0,
            pad2: 0,
            q_off: u32s(q_off),
            k_off: u32s(k_off),
            v_off: u32s(v_off),
            mu_off: u32s(mu_off),
            u_off: u32s(u_off),
            a_off: u32s(a_off),
            pad3: 0,
            pad4: 0,
        };
        let init = |label: &'static str, contents: &[u8], usage: wgpu::BufferUsages| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                label: Some(label),
                contents,
                usage,
            })
        };
        let empty = |label: &'static str, elems: u64, usage: wgpu::BufferUsages| {
            device.create_buffer(&wgpu::BufferDescriptor {
                label: Some(label),
                size: elems.max(1) * 4,
                usage,
                mapped_at_creation: false,
            })
        };
        let rw = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let readback = wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST;
        let params_buf = init(
            "sparse-attn lowrank params",
            bytemuck::bytes_of(&params),
            wgpu::BufferUsages::UNIFORM,
        );
        let data_buf = init(
            "sparse-attn lowrank inputs",
            bytemuck::cast_slice(&data),
            wgpu::BufferUsages::STORAGE,
        );
        let index_buf = init(
            "sparse-attn lowrank subset",
            bytemuck::cast_slice(&index),
            wgpu::BufferUsages::STORAGE,
        );
        let scores_buf = empty("sparse-attn lowrank scores", score_elems, rw);
        let exact_buf = empty(
            "sparse-attn lowrank subset scores",
            rows as u64 * m as u64,
            wgpu::BufferUsages::STORAGE,
        );
        let out_buf = empty("sparse-attn lowrank output", rows as u64 * d as u64, rw);
        let out_read = empty(
            "sparse-attn lowrank output readback",
            rows as u64 * d as u64,
            readback,
        );
        let scores_read = with_scores
            .then(|| empty("sparse-attn lowrank scores readback", score_elems, readback));
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("sparse-attn lowrank bind group"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry {
                    binding: 0,
                    resource: params_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 1,
                    resource: data_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 2,
                    resource: index_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 3,
                    resource: scores_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 4,
                    resource: exact_buf.as_entire_binding(),
                },
                wgpu::BindGroupEntry {
                    binding: 5,
                    resource: out_buf.as_entire_binding(),
                },
            ],
        });
        let max_grid = limits.max_compute_workgroups_per_dimension.max(1) as u64;
        let grid = |groups: u64| -> Result<(u32, u32)> {
            let gx = groups.clamp(1, max_grid);
            let gy = groups.div_ceil(gx);
            if gy > max_grid {
                return Err(Error::Limit {
                    limit: "max_compute_workgroups_per_dimension",
                    required: gy,
                    available: max_grid,
                });
            }
            Ok((gx as u32, gy as u32))
        };
        let subset_grid = grid((rows as u64 * m as u64).div_ceil(64))?;
        let row_grid = grid(rows as u64)?;
        let scope = crate::gpu::kernels::ErrorScopes::push(device);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor {
            label: Some("sparse-attn lowrank encoder"),
        });
        for (label, pipeline, (gx, gy)) in [
            ("sparse-attn lowrank subset pass", &self.subset, subset_grid),
            (
                "sparse-attn lowrank reconstruct pass",
                &self.reconstruct,
                row_grid,
            ),
        ] {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some(label),
                timestamp_writes: None,
            });
            pass.set_pipeline(pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(gx, gy, 1);
        }
        if let Some(read) = &scores_read {
            encoder.copy_buffer_to_buffer(&scores_buf, 0, read, 0, scores_buf.size());
        }
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor {
                label: Some("sparse-attn lowrank normalize pass"),
                timestamp_writes: None,
            });
            pass.set_pipeline(&self.normalize);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(row_grid.0, row_grid.1, 1);
        }
        encoder.copy_buffer_to_buffer(&out_buf, 0, &out_read, 0, out_buf.size());
        engine.queue().submit([encoder.finish()]);
        if let Some(e) = scope.pop() {
            return Err(Error::Gpu(format!("lowrank dispatch: {e}")));
        }
        let to_array =
            |xs: Vec<f32>, dims: (usize, usize, usize, usize)| -> Result<Array4<f32>> {
                let len = dims.0 * dims.1 * dims.2 * dims.3;
                let xs = xs
                    .get(..len)
                    .ok_or_else(|| Error::Gpu("lowrank readback too short".into()))?;
                Array4::from_shape_vec(dims, xs.to_vec()).map_err(|e| Error::Shape(e.to_string()))
            };
        let o = to_array(
            engine.read_buffer(&out_read)?,
            (shape.batch, shape.heads, shape.seq_q, d),
        )?;
        let scores = match &scores_read {
            Some(read) => Some(to_array(
                engine.read_buffer(read)?,
                (shape.batch, shape.heads, shape.seq_q, n),
            )?),
            None => None,
        };
        Ok(LowRankOutput { o, scores })
    }
}
