//! Typed errors. Every variant names what was wrong so a caller can act on it.

use crate::pattern::PatternError;

/// Result alias used across the crate.
pub type Result<T, E = Error> = std::result::Result<T, E>;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// Two tensors (or a tensor and the problem shape) disagree.
    #[error("shape mismatch: {0}")]
    Shape(String),
    /// A dimension that must be positive is zero.
    #[error("zero size: `{0}` must be at least 1")]
    ZeroSize(&'static str),
    /// An input holds NaN or ±inf.
    #[error("non-finite input: {tensor}[{index}] = {value}")]
    NonFinite { tensor: &'static str, index: usize, value: f32 },
    /// The pattern violates one of BlockPattern's invariants, or does not fit the problem.
    #[error("invalid pattern: {0}")]
    Pattern(#[from] PatternError),
    /// A normaliser parameter outside its domain.
    #[error("invalid normalizer: {0}")]
    Normalizer(String),
    /// The request is valid but this engine (or this adapter) has no path for it.
    #[error("unsupported: {0}")]
    Unsupported(String),
    /// A device limit that chunking cannot work around.
    #[error("adapter limit `{limit}` is {available}, this problem needs {required}")]
    Limit { limit: &'static str, required: u64, available: u64 },
    /// No adapter could be found or matched `SPARSE_ATTN_ADAPTER`.
    #[error("no GPU adapter: {0}")]
    NoAdapter(String),
    /// The adapter refused the device request (missing required feature or limit).
    #[error("device request failed: {0}")]
    RequestDevice(#[from] wgpu::RequestDeviceError),
    /// wgpu reported a validation or out-of-memory error, or a readback failed.
    #[error("GPU error: {0}")]
    Gpu(String),
    /// Reading or writing a file failed.
    #[error("I/O error on `{path}`: {source}")]
    Io { path: String, #[source] source: std::io::Error },
    /// A data or model file is malformed or lacks what was asked for.
    #[error("data: {0}")]
    Data(String),
}

impl Error {
    pub(crate) fn io(path: impl AsRef<std::path::Path>, source: std::io::Error) -> Self {
        Error::Io { path: path.as_ref().display().to_string(), source }
    }
}
