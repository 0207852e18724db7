//! One module per backend, each serving [`crate::http`] with its runtime.

#[cfg(feature = "mio")]
pub mod mio;
#[cfg(feature = "smol")]
pub mod smol;
#[cfg(feature = "tokio")]
pub mod tokio;
