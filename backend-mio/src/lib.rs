//! baton over mio (being written).
