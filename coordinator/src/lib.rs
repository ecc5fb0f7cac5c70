//! The coordinator: drives a cluster of `grok-worker` processes (see [`cluster`]) and serves
//! it over an OpenAI-compatible HTTP API: [`api`] parses and answers requests, [`scheduler`]
//! batches them continuously over the cluster's paged KV cache, [`output`] turns tokens into
//! released text (stop strings, logprobs), [`metrics`] counts it all. The `grok` binary builds
//! its commands on it.

pub mod api;
pub mod cluster;
pub mod metrics;
pub mod output;
pub mod request;
pub mod scheduler;
