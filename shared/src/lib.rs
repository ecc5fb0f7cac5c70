//! Grok-1 model core shared by the coordinator and the workers: config, checkpoint readers
//! (the release's `ckpt-0` and our native safetensors format), tokenizer, the CPU backend,
//! KV cache and sampling.

pub mod bytes;
pub mod checkpoint;
pub mod comm;
pub mod config;
pub mod cpu;
pub mod cuda;
pub mod generate;
pub mod logprobs;
pub mod mismatch;
pub mod model;
pub mod parallel;
pub mod sampling;
pub mod tokenizer;

#[doc(hidden)]
pub mod test_support;
