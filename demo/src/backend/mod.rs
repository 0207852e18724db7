//! One module per backend, each serving [`crate::http`] with its runtime.

#[cfg(feature = "tokio")]
pub mod tokio;
