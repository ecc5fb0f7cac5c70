use crate::progress::Bar;
use anyhow::{bail, Context, Result};
use grok_shared::checkpoint::init;
use grok_shared::config::ModelConfig;
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// Shape of the model.
    #[arg(long, env = "GROK_INIT_PRESET", value_parser = ["tiny", "grok-1"])]
    pub preset: String,
    /// Number of layers (default: the preset's). Real Grok-1 widths with few layers fit a laptop.
    #[arg(long, env = "GROK_INIT_LAYERS")]
    pub layers: Option<usize>,
    /// Seed of the weights: the same seed gives byte-identical files.
    #[arg(long, env = "GROK_INIT_SEED", default_value_t = 0)]
    pub seed: u64,
    /// Output directory (must not exist or be empty).
    #[arg(long, env = "GROK_INIT_OUT")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let mut cfg = ModelConfig::preset(&args.preset)?;
    if let Some(l) = args.layers {
        if l == 0 {
            bail!("--layers must be at least 1");
        }
        cfg.num_hidden_layers = l;
    }
    let mut bar = Bar::new("init");
    let report = init::init_random(&cfg, args.seed, &args.out, &mut |p| bar.update(&p))
        .with_context(|| format!("writing random weights to {}", args.out.display()))?;
    bar.finish();
    eprintln!("{}", crate::progress::summary(&report));
    Ok(())
}
