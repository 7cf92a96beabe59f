//! sparse-attn: block-sparse attention (softmax and α-entmax) on wgpu, with a naive CPU oracle.
//!
//! Data flow: a pattern builder ([`patterns`]) produces a [`BlockPattern`]; the planner
//! ([`gpu::plan`]) validates it against the problem and the adapter's limits and splits the work
//! into chunks; the kernels (SDDMM → normalise → SpMM, WGSL in `shaders/`) run it; the
//! [`reference`](mod@reference) computes the same thing on the CPU in f64.
//!
//! ```no_run
//! use sparse_attn::{patterns::Window, AttentionShape, Engine, Normalizer};
//! let shape = AttentionShape::new(1, 2, 256, 32);
//! let q = ndarray::Array4::<f32>::zeros((1, 2, 256, 32));
//! let (k, v) = (q.clone(), q.clone());
//! let engine = Engine::new()?;
//! let pattern = Window::new(64).build(&shape)?;
//! let o = engine.attention(&q, &k, &v, &pattern, Normalizer::Entmax { alpha: 1.5 })?;
//! let o_ref = sparse_attn::reference::attention(&q, &k, &v, &pattern, Normalizer::Entmax { alpha: 1.5 })?;
//! # Ok::<(), sparse_attn::Error>(())
//! ```

pub mod data;
pub mod error;
pub mod gpu;
pub mod lowrank;
pub mod metrics;
pub mod normalizer;
pub mod pattern;
pub mod patterns;
pub mod pooling;
pub mod reference;
pub mod shape;

pub use error::{Error, Result};
pub use gpu::engine::{AttentionBuffers, AttentionOptions, AttentionOutput, Engine, EntmaxPaths, RowStats, SparseProbabilities, Workspace};
pub use gpu::engine::{PreparedAttention, RunTimes};
pub use gpu::plan::{DType, ExecPath};
pub use normalizer::Normalizer;
pub use pattern::{BlockPattern, PatternError};
pub use shape::AttentionShape;
