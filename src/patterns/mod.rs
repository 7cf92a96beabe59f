//! Pattern builders: each turns a problem (and, for learned methods, Q/K) into a `BlockPattern`.

mod fixed;
pub mod sbm;
pub mod sparsefinder;
pub mod topk;
pub mod mra;

pub use fixed::{Causal, Dense, GlobalTokens, RandomBlocks, Window};

/// Block sizes used by a builder when none are given (the MRA paper's b = 32).
pub const DEFAULT_BLOCK: u32 = 32;
