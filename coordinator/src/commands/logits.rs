use crate::cluster_args::{self, ClusterArgs};
use crate::model_args::ModelArgs;
use anyhow::{bail, Context, Result};
use grok_coordinator::cluster::SeqWork;
use grok_shared::model::{blocks_for, BlockAllocator, Forward, LogitsMode, SeqStep};
use safetensors::{Dtype, SafeTensors};
use std::collections::HashMap;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub model: ModelArgs,
    #[command(flatten)]
    pub cluster: ClusterArgs,
    /// safetensors file with an int32 tensor `tokens` of shape [B, T].
    #[arg(long, env = "GROK_LOGITS_INPUT")]
    pub input: PathBuf,
    /// Where to write the f32 tensor `logits` of shape [B, T, V].
    #[arg(long, env = "GROK_LOGITS_OUTPUT")]
    pub output: PathBuf,
}

/// Reads `tokens` [B, T] int32 from a safetensors file, with errors that say what is wrong.
pub fn read_tokens(path: &std::path::Path) -> Result<(usize, usize, Vec<u32>)> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let st = SafeTensors::deserialize(&bytes)
        .with_context(|| format!("{}: not a valid safetensors file", path.display()))?;
    let t = st
        .tensor("tokens")
        .with_context(|| format!("{}: needs a tensor named `tokens`", path.display()))?;
    if t.dtype() != Dtype::I32 {
        bail!(
            "{}: `tokens` must be int32, found {:?}",
            path.display(),
            t.dtype()
        );
    }
    let &[b, len] = t.shape() else {
        bail!(
            "{}: `tokens` must have shape [B, T], found {:?}",
            path.display(),
            t.shape()
        );
    };
    let mut ids = Vec::with_capacity(b * len);
    for c in t.data().chunks_exact(4) {
        let v = i32::from_le_bytes([c[0], c[1], c[2], c[3]]);
        let id = u32::try_from(v)
            .map_err(|_| anyhow::anyhow!("{}: negative token id {v}", path.display()))?;
        ids.push(id);
    }
    Ok((b, len, ids))
}

pub fn run(args: Args) -> Result<()> {
    let (b, t, ids) = read_tokens(&args.input)?;
    if b == 0 || t == 0 {
        bail!("{}: `tokens` is empty ({b} x {t})", args.input.display());
    }
    let rows = if args.cluster.enabled() {
        logits_on_cluster(&args, b, t, &ids)?
    } else {
        let model = args.model.load_cpu()?;
        let c = model.config();
        check_rows(&args, t, c.max_seq_len)?;
        // One pool with every row's blocks: all rows in one batch.
        let bs = grok_shared::model::DEFAULT_BLOCK_SIZE;
        let per_row = blocks_for(t, bs);
        let mut kv = model.new_kv(b * per_row, bs);
        let tables: Vec<Vec<u32>> = (0..b as u32)
            .map(|i| (i * per_row as u32..(i + 1) * per_row as u32).collect())
            .collect();
        let batch: Vec<SeqStep> = ids
            .chunks_exact(t)
            .zip(&tables)
            .map(|(row, blocks)| SeqStep {
                tokens: row,
                start: 0,
                blocks,
                logits: LogitsMode::All,
            })
            .collect();
        model
            .forward(&mut kv, &batch)
            .with_context(|| format!("running {}", args.input.display()))?
    };
    let vocab = rows.first().map_or(0, |r| r.len() / t);
    let mut data = Vec::with_capacity(b * t * vocab * 4);
    for r in rows {
        for v in r {
            data.extend_from_slice(&v.to_le_bytes());
        }
    }
    let view = safetensors::tensor::TensorView::new(Dtype::F32, vec![b, t, vocab], &data)?;
    safetensors::serialize_to_file([("logits", view)], None, &args.output)
        .with_context(|| format!("writing {}", args.output.display()))?;
    Ok(())
}

fn check_rows(args: &Args, t: usize, max: usize) -> Result<()> {
    if t > max {
        bail!(
            "{}: rows of {t} tokens exceed the model's context of {max}",
            args.input.display()
        );
    }
    Ok(())
}

/// Through the cluster: row i is sequence i, all logits, in as few steps as the workers' KV
/// pools allow.
fn logits_on_cluster(args: &Args, b: usize, t: usize, ids: &[u32]) -> Result<Vec<Vec<f32>>> {
    let dir = args.model.dir()?;
    cluster_args::runtime()?.block_on(async {
        let mut cluster = args.cluster.start(&dir).await?;
        let result = async {
            check_rows(args, t, cluster.config().max_seq_len)?;
            let vocab = cluster.config().vocab_size;
            if let Some(bad) = ids.iter().find(|&&id| id as usize >= vocab) {
                bail!(
                    "{}: token id {bad} is outside the vocabulary of {vocab}",
                    args.input.display()
                );
            }
            // Row i is sequence i in group i % dp; each step takes as many rows as the
            // groups' pools hold (every pool holds at least one full row).
            let (dp, bs) = (cluster.dp(), cluster.block_size());
            let per_row = blocks_for(t, bs);
            let mut pools: Vec<BlockAllocator> = (0..dp)
                .map(|_| BlockAllocator::new(cluster.kv_blocks()))
                .collect();
            let mut out: HashMap<u64, Vec<f32>> = HashMap::new();
            let mut next = 0;
            while next < b {
                let mut work = Vec::new();
                while next < b {
                    let group = next % dp;
                    let Some(blocks) = pools[group].alloc(per_row) else {
                        break;
                    };
                    work.push(SeqWork {
                        seq_id: next as u64,
                        group,
                        start: 0,
                        tokens: ids[next * t..(next + 1) * t].to_vec(),
                        blocks,
                        logits: LogitsMode::All,
                        sample: None,
                    });
                    next += 1;
                }
                if work.is_empty() {
                    bail!("a row of {t} tokens does not fit the KV cache of a worker");
                }
                out.extend(cluster.step(&work).await?.logits);
                for w in &work {
                    pools[w.group].release(&w.blocks);
                }
            }
            (0..b as u64)
                .map(|i| out.remove(&i).context("missing logits"))
                .collect::<Result<Vec<_>>>()
        }
        .await;
        cluster.shutdown().await;
        result
    })
}
