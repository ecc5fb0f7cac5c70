//! The coordinator: drives a cluster of `grok-worker` processes (see [`cluster`]) and serves
//! it over an OpenAI-compatible HTTP API: [`api`] parses and answers requests, [`scheduler`]
//! batches them continuously over the cluster's paged KV cache, [`output`] turns tokens into
//! released text (stop strings, logprobs), [`metrics`] counts it all. The `grok` binary builds
//! its commands on it, and its client side: [`client`] talks to any OpenAI-compatible server,
//! [`loadgen`] load-tests one (`grok bench serve`), [`batch`] runs Batch files (`grok batch`).

pub mod api;
pub mod batch;
pub mod client;
pub mod cluster;
pub mod loadgen;
pub mod metrics;
pub mod output;
pub mod request;
pub mod scheduler;
