//! The coordinator: drives a cluster of `grok-worker` processes (see [`cluster`]). The `grok`
//! binary builds its commands on it.

pub mod cluster;
