//! The successive-halving soft top-k pooling operator (Pietruszka et al. 2022, "Sparsifying
//! Transformer Models with Trainable Representation Pooling"), on the CPU ([`pool`]) and the GPU
//! ([`GpuPooling`]).
//!
//! It pools a sequence of `n` token embeddings with scores down to `k = n'/2^depth` (`n'` = `n`
//! rounded up to a power of two; the padding has zero embeddings and score [`PAD_SCORE`] = 1e-5,
//! as in the paper). Each of the `depth` steps:
//! 1. sorts the tokens by score, descending (ties: the lower position first);
//! 2. pairs the i-th best with the i-th worst (the bottom half reversed);
//! 3. weighs the pair with the softmax of `base^score` over the pair, i.e.
//!    `w_a = base^{s_a} / (base^{s_a} + base^{s_b})` (paper: base 20, [`PAPER_BASE`]);
//! 4. replaces the pair by the weighted sums of the embeddings and of the scores; the new token
//!    `i` is pair `i` (so the output is ordered best pair first).
//!
//! With well-separated scores, every pair is dominated by its better token, so the `k` outputs
//! approach the embeddings of the `k` best tokens (a soft, differentiable top-k; this crate
//! implements the forward pass only).
//!
//! The GPU kernel (`pooling.wgsl`) runs one workgroup per sequence: a bitonic sort in a storage
//! scratch buffer, then the pairing, `depth` times, ping-ponging between two halves of the
//! buffers. Arithmetic is f32 on both sides.

use crate::error::{Error, Result};
use crate::Engine;
use ndarray::{Array2, Array3, ArrayView2, ArrayView3};

/// The paper's base of the pair softmax.
pub const PAPER_BASE: f32 = 20.0;
/// Score of the padding tokens.
pub const PAD_SCORE: f32 = 1e-5;

/// Pooled embeddings `[batch, k, dim]` and scores `[batch, k]`.
#[derive(Clone, Debug, PartialEq)]
pub struct Pooled {
    pub embeddings: Array3<f32>,
    pub scores: Array2<f32>,
}

/// Output length for `n` inputs and `depth` steps: `n.next_power_of_two() >> depth`.
pub fn pooled_len(n: usize, depth: u32) -> usize {
    n.next_power_of_two().checked_shr(depth).unwrap_or(0)
}

/// `(batch, padded length, dim, embeddings, scores)` after [`prepare`].
type Padded = (usize, usize, usize, Vec<f32>, Vec<f32>);

/// Validates and pads to `[batch, n', dim]` / `[batch, n']` (flat, row-major).
fn prepare(embeddings: &ArrayView3<f32>, scores: &ArrayView2<f32>, depth: u32, base: f32) -> Result<Padded> {
    let (batch, n, dim) = embeddings.dim();
    if scores.dim() != (batch, n) {
        return Err(Error::Shape(format!("pooling: embeddings {:?} but scores {:?}", embeddings.dim(), scores.dim())));
    }
    if batch == 0 || n == 0 || dim == 0 {
        return Err(Error::ZeroSize("pooling input"));
    }
    if !(base.is_finite() && base > 1.0) {
        return Err(Error::Data(format!("pooling base must be finite and > 1, got {base}")));
    }
    let np = n.next_power_of_two();
    if pooled_len(n, depth) == 0 {
        return Err(Error::Shape(format!("pooling: depth {depth} halves {n} (padded {np}) tokens below one")));
    }
    crate::shape::check_finite_values("pooling scores", scores)?;
    crate::shape::check_finite_values("pooling embeddings", embeddings)?;
    let mut e = vec![0f32; batch * np * dim];
    let mut s = vec![PAD_SCORE; batch * np];
    for b in 0..batch {
        for t in 0..n {
            s[b * np + t] = scores[[b, t]];
            for c in 0..dim {
                e[(b * np + t) * dim + c] = embeddings[[b, t, c]];
            }
        }
    }
    Ok((batch, np, dim, e, s))
}

/// CPU reference of the operator: `embeddings` `[batch, n, dim]`, `scores` `[batch, n]`.
pub fn pool(embeddings: &ArrayView3<f32>, scores: &ArrayView2<f32>, depth: u32, base: f32) -> Result<Pooled> {
    let (batch, np, dim, e, s) = prepare(embeddings, scores, depth, base)?;
    let ln_base = base.ln();
    let k = np >> depth;
    let mut out_e = Vec::with_capacity(batch * k * dim);
    let mut out_s = Vec::with_capacity(batch * k);
    for b in 0..batch {
        let mut emb = e[b * np * dim..(b + 1) * np * dim].to_vec();
        let mut sc = s[b * np..(b + 1) * np].to_vec();
        for _ in 0..depth {
            let len = sc.len();
            let mut order: Vec<usize> = (0..len).collect();
            order.sort_by(|&a, &b| sc[b].total_cmp(&sc[a]).then(a.cmp(&b)));
            let half = len / 2;
            let mut ne = vec![0f32; half * dim];
            let mut ns = vec![0f32; half];
            for i in 0..half {
                let (a, z) = (order[i], order[len - 1 - i]);
                let wa = 1.0 / (1.0 + ((sc[z] - sc[a]) * ln_base).min(0.0).exp());
                let wz = 1.0 - wa;
                for c in 0..dim {
                    ne[i * dim + c] = wa * emb[a * dim + c] + wz * emb[z * dim + c];
                }
                ns[i] = wa * sc[a] + wz * sc[z];
            }
            emb = ne;
            sc = ns;
        }
        out_e.extend_from_slice(&emb);
        out_s.extend_from_slice(&sc);
    }
    Ok(Pooled {
        embeddings: Array3::from_shape_vec((batch, k, dim), out_e).map_err(|e| Error::Shape(e.to_string()))?,
        scores: Array2::from_shape_vec((batch, k), out_s).map_err(|e| Error::Shape(e.to_string()))?,
    })
}

/// The WGSL source of the kernel (for validation).
pub const SHADER: &str = include_str!("pooling.wgsl");

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct Params {
    batch: u32,
    n: u32,
    dim: u32,
    depth: u32,
    ln_base: f32,
    pad: [u32; 3],
}

/// The pooling kernel on one engine's device: the pipeline is compiled once, in [`Self::new`].
#[derive(Debug)]
pub struct GpuPooling {
    layout: wgpu::BindGroupLayout,
    pipeline: wgpu::ComputePipeline,
}

impl GpuPooling {
    pub fn new(engine: &Engine) -> Result<Self> {
        use crate::gpu::kernels::{compile_module, Access::*};
        let bindings = [Uniform, ReadWrite, ReadWrite, ReadWrite];
        let (layout, mut pipelines) = compile_module(engine.device(), "sparse-attn pooling", SHADER, &bindings, &["main"])?;
        let pipeline = pipelines.pop().ok_or_else(|| Error::Gpu("pooling: no pipeline".into()))?;
        Ok(Self { layout, pipeline })
    }

    /// The operator on the GPU; same inputs and result as [`pool`]. `engine` must be the one
    /// this was created with. Sequences are independent: a batch past one dispatch
    /// (`max_compute_workgroups_per_dimension`, one workgroup per sequence) or one buffer runs in
    /// chunks of sequences (the engine's plan limits); one sequence past a buffer is a `Limit`.
    pub fn pool(&self, engine: &Engine, embeddings: &ArrayView3<f32>, scores: &ArrayView2<f32>, depth: u32, base: f32) -> Result<Pooled> {
        let (batch, np, dim, e, s) = prepare(embeddings, scores, depth, base)?;
        let limits = engine.plan_limits();
        // The embeddings' two regions (input and ping-pong) are the largest buffer.
        let per_sequence = (2 * np * dim * 4) as u64;
        let max = limits.max_binding_bytes.min(limits.max_buffer_bytes);
        if per_sequence > max {
            return Err(Error::Limit { limit: "max_storage_buffer_binding_size (pooling: one sequence's embeddings, twice)", required: per_sequence, available: max });
        }
        let step = ((max / per_sequence) as usize).min(limits.max_workgroups_per_dim.max(1) as usize).max(1);
        let k = np >> depth;
        let (mut out_e, mut out_s) = (Vec::with_capacity(batch * k * dim), Vec::with_capacity(batch * k));
        for b0 in (0..batch).step_by(step) {
            let b1 = (b0 + step).min(batch);
            let (ce, cs) = self.pool_padded(engine, b1 - b0, np, dim, &e[b0 * np * dim..b1 * np * dim], &s[b0 * np..b1 * np], depth, base)?;
            out_e.extend(ce);
            out_s.extend(cs);
        }
        Ok(Pooled {
            embeddings: Array3::from_shape_vec((batch, k, dim), out_e).map_err(|e| Error::Shape(e.to_string()))?,
            scores: Array2::from_shape_vec((batch, k), out_s).map_err(|e| Error::Shape(e.to_string()))?,
        })
    }

    /// One dispatch over `batch` padded sequences (`e`: `[batch, np, dim]`, `s`: `[batch, np]`):
    /// the pooled embeddings and scores, flat.
    #[allow(clippy::too_many_arguments)]
    fn pool_padded(&self, engine: &Engine, batch: usize, np: usize, dim: usize, e: &[f32], s: &[f32], depth: u32, base: f32) -> Result<(Vec<f32>, Vec<f32>)> {
        use wgpu::util::DeviceExt;
        let device = engine.device();
        let u32s = |x: usize, what: &str| u32::try_from(x).map_err(|_| Error::Shape(format!("pooling {what} {x} exceeds u32")));
        let params = Params { batch: u32s(batch, "batch")?, n: u32s(np, "length")?, dim: u32s(dim, "dim")?, depth, ln_base: base.ln(), pad: [0; 3] };
        // Region 0 holds the input; region 1 starts zeroed.
        let mut emb2 = vec![0f32; batch * 2 * np * dim];
        let mut sc2 = vec![0f32; batch * 2 * np];
        for b in 0..batch {
            emb2[b * 2 * np * dim..(b * 2 + 1) * np * dim].copy_from_slice(&e[b * np * dim..(b + 1) * np * dim]);
            sc2[b * 2 * np..(b * 2 + 1) * np].copy_from_slice(&s[b * np..(b + 1) * np]);
        }
        let storage = wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC;
        let params_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
            label: Some("sparse-attn pooling params"),
            contents: bytemuck::bytes_of(&params),
            usage: wgpu::BufferUsages::UNIFORM,
        });
        let emb_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("sparse-attn pooling embeddings"), contents: bytemuck::cast_slice(&emb2), usage: storage });
        let score_buf = device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some("sparse-attn pooling scores"), contents: bytemuck::cast_slice(&sc2), usage: storage });
        let order_buf = device.create_buffer(&wgpu::BufferDescriptor {
            label: Some("sparse-attn pooling order"),
            size: (batch * np * 4) as u64,
            usage: wgpu::BufferUsages::STORAGE,
            mapped_at_creation: false,
        });
        let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
            label: Some("sparse-attn pooling bind group"),
            layout: &self.layout,
            entries: &[
                wgpu::BindGroupEntry { binding: 0, resource: params_buf.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 1, resource: emb_buf.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 2, resource: score_buf.as_entire_binding() },
                wgpu::BindGroupEntry { binding: 3, resource: order_buf.as_entire_binding() },
            ],
        });
        let read = |label: &'static str, size: u64| {
            device.create_buffer(&wgpu::BufferDescriptor { label: Some(label), size, usage: wgpu::BufferUsages::MAP_READ | wgpu::BufferUsages::COPY_DST, mapped_at_creation: false })
        };
        let emb_read = read("sparse-attn pooling embeddings readback", emb_buf.size());
        let score_read = read("sparse-attn pooling scores readback", score_buf.size());
        let scope = crate::gpu::kernels::ErrorScopes::push(device);
        let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sparse-attn pooling encoder") });
        {
            let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("sparse-attn pooling pass"), timestamp_writes: None });
            pass.set_pipeline(&self.pipeline);
            pass.set_bind_group(0, &bind_group, &[]);
            pass.dispatch_workgroups(params.batch, 1, 1);
        }
        encoder.copy_buffer_to_buffer(&emb_buf, 0, &emb_read, 0, emb_buf.size());
        encoder.copy_buffer_to_buffer(&score_buf, 0, &score_read, 0, score_buf.size());
        engine.queue().submit([encoder.finish()]);
        if let Some(e) = scope.pop() {
            return Err(Error::Gpu(format!("pooling dispatch: {e}")));
        }
        let ef: Vec<f32> = engine.read_buffer(&emb_read)?;
        let sf: Vec<f32> = engine.read_buffer(&score_read)?;
        let region = (depth % 2) as usize;
        let k = np >> depth;
        let mut out_e = Vec::with_capacity(batch * k * dim);
        let mut out_s = Vec::with_capacity(batch * k);
        for b in 0..batch {
            let se = (b * 2 + region) * np;
            out_e.extend_from_slice(ef.get(se * dim..(se + k) * dim).ok_or_else(|| Error::Gpu("pooling readback too short".into()))?);
            out_s.extend_from_slice(sf.get(se..se + k).ok_or_else(|| Error::Gpu("pooling readback too short".into()))?);
        }
        Ok((out_e, out_s))
    }
}
