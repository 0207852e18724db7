//! baton-demo: an HTTP/1.1 server that upgrades itself without dropping a
//! request, and the load client that proves it.

pub mod http;
pub mod load;
