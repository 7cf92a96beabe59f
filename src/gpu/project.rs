//! Batched row projections on the GPU (`y = x·W + b` per slice), for pattern predictors whose
//! projections of long sequences should not run on the CPU.

use super::engine::Engine;
use super::kernels::{KernelKey, KernelKind};
use super::plan::DType;
use crate::error::{Error, Result};
use ndarray::{Array3, ArrayView3};
use wgpu::util::DeviceExt;

/// Largest rank the projection kernel accepts.
pub const MAX_PROJECT_RANK: usize = 32;

#[repr(C)]
#[derive(Clone, Copy, bytemuck::Pod, bytemuck::Zeroable)]
struct ProjectParams {
    rows: u32,
    dim: u32,
    rank: u32,
    x_base: u32,
    w_base: u32,
    b_base: u32,
    y_base: u32,
    pad: u32,
}

impl Engine {
    /// `y[s] = x[s]·W[s] + b[s]` for every slice `s`: `x` `[slices, rows, dim]`, `w` `slices·dim·rank`
    /// (each `dim × rank` row-major), `b` `slices·rank`. Work past one binding is split by rows.
    pub fn project_batched(&self, x: &ArrayView3<f32>, w: &[f32], b: &[f32], rank: usize) -> Result<Array3<f32>> {
        let (slices, rows, dim) = x.dim();
        if slices == 0 || rows == 0 || dim == 0 || rank == 0 {
            return Err(Error::ZeroSize("projection input"));
        }
        if rank > MAX_PROJECT_RANK {
            return Err(Error::Unsupported(format!("projection rank {rank} exceeds {MAX_PROJECT_RANK}")));
        }
        if w.len() != slices * dim * rank || b.len() != slices * rank {
            return Err(Error::Shape(format!(
                "projection of {slices} slices of {dim}-dim rows to rank {rank} needs {} weights and {} biases, got {} and {}",
                slices * dim * rank,
                slices * rank,
                w.len(),
                b.len()
            )));
        }
        crate::shape::check_finite_values("projection input", x)?;
        crate::shape::check_finite_values("projection weights", w)?;
        crate::shape::check_finite_values("projection biases", b)?;
        let device = self.device();
        let limits = device.limits();
        let max_binding = limits.max_storage_buffer_binding_size;
        // Rows per dispatch: the x and y windows both fit one binding, and the grid fits.
        let per_row = (dim.max(rank) * 4) as u64;
        let max_grid = limits.max_compute_workgroups_per_dimension as u64;
        let chunk_rows = (max_binding / per_row).min(max_grid * max_grid * 64).max(1) as usize;
        let kernel = self.kernel_for(KernelKey { kind: KernelKind::Project, dtype: DType::F32, block_q: 16, block_k: 16, d_chunk: 0, fused: None, subgroups: false, vec4: false })?;
        let storage = |label: &str, data: &[f32]| {
            device.create_buffer_init(&wgpu::util::BufferInitDescriptor { label: Some(label), contents: bytemuck::cast_slice(data), usage: wgpu::BufferUsages::STORAGE })
        };
        let wb = storage("sparse-attn projection weights", w);
        let bb = storage("sparse-attn projection biases", b);
        let mut out = Array3::<f32>::zeros((slices, rows, rank));
        let xs = x.as_standard_layout();
        let x_flat = xs.as_slice().ok_or_else(|| Error::Shape("projection input is not contiguous".into()))?;
        for s in 0..slices {
            for r0 in (0..rows).step_by(chunk_rows) {
                let n = chunk_rows.min(rows - r0);
                let xb = storage("sparse-attn projection x", &x_flat[(s * rows + r0) * dim..(s * rows + r0 + n) * dim]);
                let y_bytes = (n * rank * 4) as u64;
                let yb = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("sparse-attn projection y"),
                    size: y_bytes,
                    usage: wgpu::BufferUsages::STORAGE | wgpu::BufferUsages::COPY_SRC,
                    mapped_at_creation: false,
                });
                let read = device.create_buffer(&wgpu::BufferDescriptor {
                    label: Some("sparse-attn projection readback"),
                    size: y_bytes,
                    usage: wgpu::BufferUsages::COPY_DST | wgpu::BufferUsages::MAP_READ,
                    mapped_at_creation: false,
                });
                let params = ProjectParams {
                    rows: n as u32,
                    dim: dim as u32,
                    rank: rank as u32,
                    x_base: 0,
                    w_base: (s * dim * rank) as u32,
                    b_base: (s * rank) as u32,
                    y_base: 0,
                    pad: 0,
                };
                let ub = device.create_buffer_init(&wgpu::util::BufferInitDescriptor {
                    label: Some("sparse-attn projection params"),
                    contents: bytemuck::bytes_of(&params),
                    usage: wgpu::BufferUsages::UNIFORM,
                });
                let bind_group = device.create_bind_group(&wgpu::BindGroupDescriptor {
                    label: Some("sparse-attn projection"),
                    layout: &kernel.layout,
                    entries: &[
                        wgpu::BindGroupEntry { binding: 0, resource: ub.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 1, resource: xb.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 2, resource: wb.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 3, resource: bb.as_entire_binding() },
                        wgpu::BindGroupEntry { binding: 4, resource: yb.as_entire_binding() },
                    ],
                });
                let groups = (n as u64).div_ceil(64);
                let gx = groups.min(max_grid) as u32;
                let gy = groups.div_ceil(gx as u64) as u32;
                let mut encoder = device.create_command_encoder(&wgpu::CommandEncoderDescriptor { label: Some("sparse-attn projection") });
                {
                    let mut pass = encoder.begin_compute_pass(&wgpu::ComputePassDescriptor { label: Some("project"), timestamp_writes: None });
                    pass.set_pipeline(&kernel.pipeline);
                    pass.set_bind_group(0, &bind_group, &[]);
                    pass.dispatch_workgroups(gx, gy, 1);
                }
                encoder.copy_buffer_to_buffer(&yb, 0, &read, 0, y_bytes);
                self.queue().submit([encoder.finish()]);
                let ys: Vec<f32> = self.read_buffer(&read)?;
                for (i, row) in ys.chunks_exact(rank).enumerate() {
                    for (c, &v) in row.iter().enumerate() {
                        out[[s, r0 + i, c]] = v;
                    }
                }
            }
        }
        Ok(out)
    }
}
