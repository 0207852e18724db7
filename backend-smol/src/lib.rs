//! baton over smol (being written).
