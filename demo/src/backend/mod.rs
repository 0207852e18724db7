//! One module per backend, each serving [`crate::http`] with its runtime.
//! tokio and smol share [`server`] and [`conn`]: baton's async driver runs
//! the lifecycle, and only the stream type differs.

#[cfg(any(feature = "tokio", feature = "smol"))]
pub mod conn;
#[cfg(feature = "mio")]
pub mod mio;
#[cfg(any(feature = "tokio", feature = "smol"))]
pub mod server;
#[cfg(feature = "smol")]
pub mod smol;
#[cfg(feature = "tokio")]
pub mod tokio;
