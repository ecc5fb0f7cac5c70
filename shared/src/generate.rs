//! Generation for one sequence in one process: prefill the prompt, then decode token by token
//! from the KV cache until `max_tokens`, end of sequence, or the context is full.

use crate::model::{Forward, LogitsMode, ModelError, SeqKv};
use crate::sampling::{Sampler, SamplingError};

#[derive(Debug, thiserror::Error)]
pub enum GenerateError {
    #[error(transparent)]
    Model(#[from] ModelError),
    #[error(transparent)]
    Sampling(#[from] SamplingError),
    #[error("the prompt is empty")]
    EmptyPrompt,
    /// A remote backend (a cluster) failed.
    #[error("{0}")]
    Backend(String),
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

/// Generates up to `max_tokens` after `prompt` on `model`, calling `on_token` with each new
/// token as it is chosen. Generation stops early at `eos` when given.
pub fn generate(
    model: &dyn Forward,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
    on_token: impl FnMut(u32),
) -> Result<Generation, GenerateError> {
    let mut cache = SeqKv::new(model);
    let mut step = |input: &[u32]| -> Result<Vec<f32>, GenerateError> {
        Ok(cache.step(model, input, LogitsMode::Last)?)
    };
    let ctx = model.config().max_seq_len;
    generate_with(&mut step, ctx, prompt, max_tokens, sampler, eos, on_token)
}

/// Appends new tokens to a sequence (wherever its KV cache lives) and returns the last
/// position's logits.
pub type StepFn<'a> = dyn FnMut(&[u32]) -> Result<Vec<f32>, GenerateError> + 'a;

/// The generation loop over any backend, driven by `step`.
pub fn generate_with(
    step: &mut StepFn<'_>,
    max_ctx: usize,
    prompt: &[u32],
    max_tokens: usize,
    sampler: &mut Sampler,
    eos: Option<u32>,
    mut on_token: impl FnMut(u32),
) -> Result<Generation, GenerateError> {
    if prompt.is_empty() {
        return Err(GenerateError::EmptyPrompt);
    }
    if prompt.len() > max_ctx {
        return Err(ModelError::ContextOverflow {
            len: prompt.len(),
            max: max_ctx,
        }
        .into());
    }
    let mut len = 0;
    let mut tokens = Vec::new();
    let mut input: Vec<u32> = prompt.to_vec();
    while tokens.len() < max_tokens {
        if len + input.len() > max_ctx {
            return Ok(Generation {
                tokens,
                finish: FinishReason::Context,
            });
        }
        let logits = step(&input)?;
        len += input.len();
        let next = sampler.sample(&logits)?;
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
