//! The GPU side: adapter and device (`device`), pure planning (`plan`), shader sources and the
//! pipeline cache (`kernels`), and the `Engine` that encodes and runs them (`engine`).

pub mod device;
pub mod engine;
pub mod kernels;
pub mod plan;
pub mod project;
pub mod tiles;
pub(crate) mod unroll;
pub mod timing;
