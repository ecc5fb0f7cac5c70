//! Generation for one sequence in one process: prefill the prompt, then decode token by token
//! from the KV cache until `max_tokens`, end of sequence, or the context is full.

use crate::model::{Forward, LogitsMode, ModelError, SeqStep};
use crate::sampling::{Sampler, SamplingError};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the prompt is empty")]
    EmptyPrompt,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FinishReason {
    /// `max_tokens` reached.
    Length,
    /// The model produced the end-of-sequence token (not included in the output).
    Eos,
    /// The model's context is full.
    Context,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Generation {
    pub tokens: Vec<u32>,
    pub finish: FinishReason,
}

/// Generates up to `max_tokens` after `prompt`, calling `on_token` with each new token as it
/// is chosen. Generation stops early at `eos` when given.
pub fn generate(
    model: &dyn Forward,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    let max_ctx = model.config().max_seq_len;
    if prompt.len() > max_ctx {
        return Err(ModelError::ContextOverflow {
            len: prompt.len(),
            max: max_ctx,
        }
        .into());
    }
    let mut cache = model.new_cache();
    let mut tokens = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    while tokens.len() < max_tokens {
        if cache.len() + input.len() > max_ctx {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Context,
            });
        }
        let mut step = [SeqStep {
            tokens: &input,
            cache: &mut cache,
        }];
        let logits = model.forward(&mut step, LogitsMode::Last)?;
        let next = sampler.sample(logits.first().map(Vec::as_slice).unwrap_or(&[]))?;
        if Some(next) == eos {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Eos,
            });
        }
        tokens.push(next);
        on_token(next);
        input = vec![next];
    }
    Ok(Generation {
        tokens,
        finish: FinishReason::Length,
    })
}
