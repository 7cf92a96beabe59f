//! Projections on the GPU for long sequences: the same `x·W + b` as the CPU path, batched over
//! slices with [`Engine::project_batched`].

use super::predict::Projected;
use super::{Sparsefinder, SparsefinderModel, Variant};
use crate::error::Result;
use crate::pattern::BlockPattern;
use crate::Engine;
use ndarray::{Array3, ArrayView4, Axis};

/// Sequence length from which [`SparsefinderModel::build_with_engine`] projects on the GPU.
pub const GPU_PROJECTION_MIN_SEQ: usize = 2048;

impl SparsefinderModel {
    /// [`SparsefinderModel::project`] on the GPU.
    pub fn project_gpu<'a>(
        &self,
        engine: &Engine,
        layer: usize,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        variant: &Variant,
    ) -> Result<Projected> {
        let (q, k) = (q.into(), k.into());
        // The CPU path validates shapes and values; reuse it on a 1-row probe of the input.
        let probe = self.project(layer, q.slice(ndarray::s![.., .., ..1, ..]), k.slice(ndarray::s![.., .., ..1, ..]), variant)?;
        let mut shape = probe.shape;
        (shape.seq_q, shape.seq_kv) = (q.shape()[2], k.shape()[2]);
        crate::shape::check_finite("q", &q)?;
        crate::shape::check_finite("k", &k)?;
        let rank = self.rank();
        let slices = shape.slices();
        let (mut wq, mut bq, mut wk, mut bk) = (Vec::new(), Vec::new(), Vec::new(), Vec::new());
        let mut xq = Array3::<f32>::zeros((slices, shape.seq_q, shape.head_dim));
        let mut xk = Array3::<f32>::zeros((slices, shape.seq_kv, shape.head_dim));
        for s in 0..slices {
            let (b, h) = (s / shape.heads, s % shape.heads);
            let p = self.head(layer, h)?.projection(variant);
            wq.extend_from_slice(&p.w_q);
            bq.extend_from_slice(&p.b_q);
            wk.extend_from_slice(&p.w_k);
            bk.extend_from_slice(&p.b_k);
            xq.index_axis_mut(Axis(0), s).assign(&q.index_axis(Axis(0), b).index_axis(Axis(0), h));
            xk.index_axis_mut(Axis(0), s).assign(&k.index_axis(Axis(0), b).index_axis(Axis(0), h / shape.group()));
        }
        let pq = engine.project_batched(&xq.view(), &wq, &bq, rank)?;
        let pk = engine.project_batched(&xk.view(), &wk, &bk, rank)?;
        Ok(Projected {
            shape,
            q: pq.outer_iter().map(|a| a.to_owned()).collect(),
            k: pk.outer_iter().map(|a| a.to_owned()).collect(),
        })
    }

    /// [`SparsefinderModel::build`], projecting on the GPU from [`GPU_PROJECTION_MIN_SEQ`] tokens.
    pub fn build_with_engine<'a>(
        &self,
        engine: &Engine,
        layer: usize,
        q: impl Into<ArrayView4<'a, f32>>,
        k: impl Into<ArrayView4<'a, f32>>,
        spec: &Sparsefinder,
    ) -> Result<BlockPattern> {
        let (q, k) = (q.into(), k.into());
        if q.shape()[2].max(k.shape()[2]) < GPU_PROJECTION_MIN_SEQ {
            return self.build(layer, q, k, spec);
        }
        spec.variant.validate()?;
        let projected = self.project_gpu(engine, layer, q, k, &spec.variant)?;
        self.build_projected(layer, &projected, spec)
    }
}
