//! The Grok-1 model independent of where it runs: weights in their stored precision, the KV
//! cache, and the [`Forward`] seam each backend (CPU now, CUDA later) implements.

pub mod kv_cache;
pub mod weights;

pub use kv_cache::KvCache;
pub use weights::{ModelWeights, QMatrix, Slices};

use crate::checkpoint::CheckpointError;

#[derive(Debug, thiserror::Error)]
pub enum ModelError {
    #[error(transparent)]
    Checkpoint(#[from] CheckpointError),
    #[error("tensor '{name}': {msg}")]
    BadTensor { name: String, msg: String },
    #[error("token id {id} is outside the vocabulary (size {vocab})")]
    TokenOutOfRange { id: u32, vocab: usize },
    #[error("sequence would reach {len} tokens, beyond the model's context of {max}")]
    ContextOverflow { len: usize, max: usize },
    #[error("batch entry {index} has no tokens")]
    EmptySequence { index: usize },
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    /// A peer rank sent something inconsistent with the plan.
    #[error("rank {rank}: {msg}")]
    Peer { rank: usize, msg: String },
}

/// Which positions' logits a forward pass returns.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// Every input position (`[T, V]` per sequence).
    All,
    /// Only the last input position (`[1, V]` per sequence): what decoding needs.
    Last,
}

/// One sequence in a batch step: its new tokens, appended after what its cache holds.
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    pub cache: &'a mut KvCache,
}

/// A backend that runs the Grok-1 forward pass.
pub trait Forward {
    fn config(&self) -> &crate::config::ModelConfig;
    /// A cache sized for this model.
    fn new_cache(&self) -> KvCache;
    /// Runs the new tokens of every sequence (of any lengths) through the model, appending
    /// their keys/values to each cache; returns each sequence's logits, row-major `[rows, V]`.
    fn forward(
        &self,
        batch: &mut [SeqStep<'_>],
        mode: LogitsMode,
    ) -> Result<Vec<Vec<f32>>, ModelError>;
}
