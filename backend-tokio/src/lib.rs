//! baton over tokio.
