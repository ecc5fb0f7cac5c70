//! The Grok-1 model independent of where it runs: weights in their stored precision, the
//! paged KV cache, and the [`Forward`] seam each backend (CPU now, CUDA later) implements.

pub mod kv_cache;
pub mod weights;

pub use kv_cache::{blocks_for, BlockAllocator, PagedKv, SeqKv, DEFAULT_BLOCK_SIZE};
pub use weights::{ModelWeights, QMatrix, Slices};

use crate::checkpoint::CheckpointError;
use crate::comm::Communicator;
use crate::config::ModelConfig;
use crate::parallel::Plan;
use std::collections::{HashMap, HashSet};
use std::time::Duration;

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
    #[error(
        "the KV pool holds {layers} layer(s) of kv_dim {kv_dim}, but this shard needs \
         {want_layers} layer(s) of kv_dim {want_kv_dim}: it was made for another model or shard"
    )]
    WrongPool {
        layers: usize,
        kv_dim: usize,
        want_layers: usize,
        want_kv_dim: usize,
    },
    #[error("batch entry {index}: block id {block} is outside the KV pool of {num_blocks} blocks")]
    BlockOutOfRange {
        index: usize,
        block: u32,
        num_blocks: usize,
    },
    #[error(
        "batch entry {index}: {have} block(s) of {block_size} positions cannot hold its \
         {positions} positions (needs {need})"
    )]
    TooFewBlocks {
        index: usize,
        have: usize,
        need: usize,
        positions: usize,
        block_size: usize,
    },
    #[error("batch entry {index}: block {block} appears twice in its block table")]
    RepeatedBlock { index: usize, block: u32 },
    /// Two sequences writing (or one writing what another reads) would corrupt each other.
    #[error(
        "block {block} is written by batch entry {writer} and also used by batch entry {other} \
         in the same step"
    )]
    SharedBlock {
        block: u32,
        writer: usize,
        other: usize,
    },
    #[error(transparent)]
    Comm(#[from] crate::comm::CommError),
    #[error(transparent)]
    Device(#[from] crate::cuda::CudaError),
    /// A peer rank sent something inconsistent with the plan.
    #[error("rank {rank}: {msg}")]
    Peer { rank: usize, msg: String },
}

/// Which positions' logits a forward pass returns for one sequence.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogitsMode {
    /// None (an empty vector): intermediate chunks of a prefill, which only fill the cache.
    None,
    /// Every input position (`[T, V]`).
    All,
    /// Only the last input position (`[1, V]`): what decoding needs.
    Last,
}

impl LogitsMode {
    /// Rows of logits for `tokens` new tokens.
    pub fn rows(self, tokens: usize) -> usize {
        match self {
            LogitsMode::None => 0,
            LogitsMode::All => tokens,
            LogitsMode::Last => usize::from(tokens > 0),
        }
    }
}

/// One sequence's part of a batch step: its new tokens, taking positions `start..`, after the
/// `start` positions its blocks already hold.
#[derive(Debug, Clone, Copy)]
pub struct SeqStep<'a> {
    pub tokens: &'a [u32],
    /// Positions already in the cache.
    pub start: usize,
    /// Block table (ids in the pool), covering at least `start + tokens.len()` positions.
    pub blocks: &'a [u32],
    pub logits: LogitsMode,
}

/// A backend that runs the Grok-1 forward pass.
pub trait Forward {
    fn config(&self) -> &ModelConfig;
    /// A KV pool of `num_blocks` blocks of `block_size` positions sized for this model.
    fn new_kv(&self, num_blocks: usize, block_size: usize) -> PagedKv;
    /// Runs the new tokens of every sequence (of any lengths) through the model, writing their
    /// keys/values into each sequence's blocks of `kv`; returns one vector per sequence: its
    /// logits row-major `[rows, V]` as its [`LogitsMode`] asks (empty for `None`).
    fn forward(&self, kv: &mut PagedKv, batch: &[SeqStep<'_>])
        -> Result<Vec<Vec<f32>>, ModelError>;
}

/// One rank's slice of the model and its KV pool, on the device it computes on: what a worker
/// holds and steps (the CPU and CUDA backends implement it).
pub trait RankBackend: Send {
    fn rank(&self) -> usize;
    fn plan(&self) -> &Plan;
    fn config(&self) -> &ModelConfig;
    /// Where it computes (`cpu`, `cuda:N (name)`).
    fn device(&self) -> String;
    /// One step for the sequences of this rank's data-parallel group, in lockstep with every
    /// rank of the world (an empty batch when the group has no work).
    fn step(
        &mut self,
        comm: &dyn Communicator,
        batch: &[SeqStep<'_>],
    ) -> Result<ShardOutput, ModelError>;
}

/// What one rank's step returns.
#[derive(Debug, Clone, Default)]
pub struct ShardOutput {
    /// Each sequence's logits (as its [`LogitsMode`] asks), on the first rank of each TP
    /// group; `None` on the others.
    pub logits: Option<Vec<Vec<f32>>>,
    /// `[layers * num_local_experts]`: tokens this rank's router sent to each expert this step
    /// (a token counts once for each expert it chose).
    pub expert_tokens: Vec<u64>,
    /// Time spent inside communicator calls (waiting on peers included).
    pub comm_time: Duration,
}

/// Checks a batch against the model and a pool of `num_blocks` blocks of `block_size`
/// positions, as every backend does before touching state (and as a coordinator can before
/// sending a step, so no rank ever sees work its peers refuse); returns every token's
/// position. Rejects anything that would index outside the pool or let one sequence's writes
/// land in blocks another sequence of the step uses.
pub fn check_steps(
    c: &ModelConfig,
    block_size: usize,
    num_blocks: usize,
    batch: &[SeqStep<'_>],
) -> Result<Vec<usize>, ModelError> {
    let bs = block_size.max(1);
    let mut positions = Vec::new();
    // Which entry writes each block this step.
    let mut writer: HashMap<u32, usize> = HashMap::new();
    for (i, s) in batch.iter().enumerate() {
        if s.tokens.is_empty() {
            return Err(ModelError::EmptySequence { index: i });
        }
        if let Some(&id) = s.tokens.iter().find(|&&t| t as usize >= c.vocab_size) {
            return Err(ModelError::TokenOutOfRange {
                id,
                vocab: c.vocab_size,
            });
        }
        let end = s.start.saturating_add(s.tokens.len());
        if end > c.max_seq_len {
            return Err(ModelError::ContextOverflow {
                len: end,
                max: c.max_seq_len,
            });
        }
        if let Some(&block) = s.blocks.iter().find(|&&b| b as usize >= num_blocks) {
            return Err(ModelError::BlockOutOfRange {
                index: i,
                block,
                num_blocks,
            });
        }
        let need = blocks_for(end, bs);
        if s.blocks.len() < need {
            return Err(ModelError::TooFewBlocks {
                index: i,
                have: s.blocks.len(),
                need,
                positions: end,
                block_size: bs,
            });
        }
        let used = &s.blocks[..need];
        let mut seen = HashSet::with_capacity(need);
        if let Some(&block) = used.iter().find(|&&b| !seen.insert(b)) {
            return Err(ModelError::RepeatedBlock { index: i, block });
        }
        // Tokens are non-empty, so start / bs < need.
        for &b in &used[s.start / bs..] {
            if let Some(&other) = writer.get(&b) {
                return Err(ModelError::SharedBlock {
                    block: b,
                    writer: other,
                    other: i,
                });
            }
            writer.insert(b, i);
        }
        positions.extend(s.start..end);
    }
    // A block written by one entry must not be read by another either (it would see the
    // writer's new rows); blocks only read may be shared (a common prefix).
    for (i, s) in batch.iter().enumerate() {
        let need = blocks_for(s.start + s.tokens.len(), bs);
        for &b in &s.blocks[..need] {
            if let Some(&w) = writer.get(&b) {
                if w != i {
                    return Err(ModelError::SharedBlock {
                        block: b,
                        writer: w,
                        other: i,
                    });
                }
            }
        }
    }
    Ok(positions)
}
