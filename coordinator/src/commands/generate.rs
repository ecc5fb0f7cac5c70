use crate::cluster_args::{self, ClusterArgs};
use crate::model_args::{ModelArgs, TokenizerArgs};
use anyhow::{bail, Context, Result};
use grok_coordinator::cluster::SeqWork;
use grok_shared::generate::{generate, generate_with, GenerateError, Generation};
use grok_shared::model::{blocks_for, BlockAllocator, Forward, LogitsMode};
use grok_shared::sampling::{Sampler, SamplingParams};
use grok_shared::tokenizer::Tokenizer;
use std::io::Write;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// Prompt text (encoded with the tokenizer, no BOS added, as the release does).
    #[arg(
        long,
        env = "GROK_PROMPT",
        conflicts_with = "prompt_ids",
        required_unless_present = "prompt_ids"
    )]
    pub prompt: Option<String>,
    /// Prompt as comma-separated token ids, e.g. 1,2,3.
    #[arg(long, env = "GROK_PROMPT_IDS", value_delimiter = ',')]
    pub prompt_ids: Option<Vec<u32>>,
    /// Maximum number of tokens to generate.
    #[arg(long, env = "GROK_MAX_TOKENS", default_value_t = 32)]
    pub max_tokens: usize,
    /// Sampling temperature; 0 is greedy.
    #[arg(long, env = "GROK_TEMPERATURE", default_value_t = 0.0)]
    pub temperature: f32,
    /// Nucleus sampling: keep the smallest set of tokens whose probability reaches P.
    #[arg(long, env = "GROK_TOP_P", default_value_t = 1.0)]
    pub top_p: f32,
    /// Keep only the K most likely tokens (0: no limit).
    #[arg(long, env = "GROK_TOP_K", default_value_t = 0)]
    pub top_k: usize,
    /// Seed of the sampler: the same seed gives the same tokens.
    #[arg(long, env = "GROK_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Print the generated token ids (space-separated, one line) instead of text.
    #[arg(long, env = "GROK_PRINT_IDS")]
    pub print_ids: bool,
}

pub fn run(args: Args) -> Result<()> {
    let params = SamplingParams {
        temperature: args.temperature,
        top_k: args.top_k,
        top_p: args.top_p,
        seed: args.seed,
    };
    let mut sampler = Sampler::new(params)
        .context("invalid sampling flags (--temperature >= 0, 0 < --top-p <= 1)")?;
    // The tokenizer is needed for text in or out; a model without one can use ids both ways.
    let tokenizer = if args.prompt.is_some() || !args.print_ids {
        Some(args.tokenizer.load()?)
    } else {
        None
    };
    let prompt: Vec<u32> = match (&args.prompt, &args.prompt_ids, &tokenizer) {
        (Some(text), _, Some(tok)) => tok.encode(text),
        (None, Some(ids), _) => ids.clone(),
        _ => bail!("give --prompt TEXT or --prompt-ids 1,2,3"),
    };
    if prompt.is_empty() {
        bail!("the prompt is empty: give a non-empty --prompt or --prompt-ids");
    }
    if args.cluster.enabled() {
        let dir = args.model.dir()?;
        return cluster_args::runtime()?.block_on(async {
            let mut cluster = args.cluster.start(&dir).await?;
            let (vocab, ctx, eos) = {
                let c = cluster.config();
                (c.vocab_size, c.max_seq_len, c.eos_token_id)
            };
            let result = match check_prompt(&prompt, vocab, tokenizer.as_ref(), args.print_ids) {
                Ok(()) => tokio::task::block_in_place(|| {
                    let handle = tokio::runtime::Handle::current();
                    // The one sequence lives in group 0; its blocks are taken as it grows.
                    let bs = cluster.block_size();
                    let mut pool = BlockAllocator::new(cluster.kv_blocks());
                    let mut blocks: Vec<u32> = Vec::new();
                    let mut len = 0;
                    let mut step = |input: &[u32]| -> Result<Vec<f32>, GenerateError> {
                        let need = blocks_for(len + input.len(), bs);
                        if need > blocks.len() {
                            // The pool holds at least one full context (checked at start), so
                            // this fails only if the generation loop overran the context.
                            let more = pool.alloc(need - blocks.len()).ok_or_else(|| {
                                GenerateError::Backend(format!(
                                    "the KV cache has no room for {} positions",
                                    len + input.len()
                                ))
                            })?;
                            blocks.extend(more);
                        }
                        let work = SeqWork {
                            seq_id: 0,
                            group: 0,
                            start: len,
                            tokens: input.to_vec(),
                            blocks: blocks.clone(),
                            logits: LogitsMode::Last,
                            sample: None,
                        };
                        let mut out = handle
                            .block_on(cluster.step(&[work]))
                            .map_err(|e| GenerateError::Backend(e.to_string()))?;
                        len += input.len();
                        out.logits.remove(&0).ok_or_else(|| {
                            GenerateError::Backend("no logits for the sequence".into())
                        })
                    };
                    print_generation(&args, tokenizer.as_ref(), &mut sampler, |s, on_token| {
                        generate_with(
                            &mut step,
                            ctx,
                            &prompt,
                            args.max_tokens,
                            s,
                            Some(eos),
                            on_token,
                        )
                    })
                }),
                Err(e) => Err(e),
            };
            cluster.shutdown().await;
            result
        });
    }
    let model = args.model.load_cpu()?;
    check_prompt(
        &prompt,
        model.config().vocab_size,
        tokenizer.as_ref(),
        args.print_ids,
    )?;
    let eos = Some(model.config().eos_token_id);
    print_generation(&args, tokenizer.as_ref(), &mut sampler, |s, on_token| {
        generate(&model, &prompt, args.max_tokens, s, eos, on_token)
    })
}

fn check_prompt(
    prompt: &[u32],
    vocab: usize,
    tokenizer: Option<&Tokenizer>,
    print_ids: bool,
) -> Result<()> {
    if let Some(bad) = prompt.iter().find(|&&t| t as usize >= vocab) {
        bail!("prompt token id {bad} is outside the model's vocabulary of {vocab}");
    }
    if let Some(tok) = tokenizer {
        if tok.vocab_size() > vocab && !print_ids {
            tracing::warn!(
                "the tokenizer has {} pieces but the model only {vocab}: use --print-ids for this model",
                tok.vocab_size()
            );
        }
    }
    Ok(())
}

/// Runs `run` (a generation loop taking the sampler and a per-token callback) and prints its
/// tokens: ids on one line, or text as it streams.
fn print_generation(
    args: &Args,
    tokenizer: Option<&Tokenizer>,
    sampler: &mut Sampler,
    run: impl FnOnce(&mut Sampler, &mut dyn FnMut(u32)) -> Result<Generation, GenerateError>,
) -> Result<()> {
    let mut stdout = std::io::stdout().lock();
    if args.print_ids {
        let g = run(sampler, &mut |_| {})?;
        let line: Vec<String> = g.tokens.iter().map(u32::to_string).collect();
        writeln!(stdout, "{}", line.join(" "))?;
        return Ok(());
    }
    let tok = tokenizer.context("a tokenizer is needed to print text")?;
    let mut stream = tok.decode_stream();
    let mut failed = None;
    run(sampler, &mut |id| match stream.step(id) {
        Ok(Some(text)) => {
            let _ = stdout.write_all(text.as_bytes());
            let _ = stdout.flush();
        }
        Ok(None) => {}
        Err(e) => {
            failed.get_or_insert(e);
        }
    })?;
    if let Some(e) = failed {
        return Err(e).context(
            "decoding generated tokens (use --print-ids for a model whose vocabulary differs from the tokenizer's)",
        );
    }
    write!(stdout, "{}", stream.finish())?;
    writeln!(stdout)?;
    Ok(())
}
