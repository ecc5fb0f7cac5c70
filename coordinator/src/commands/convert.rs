use crate::progress::Bar;
use anyhow::{Context, Result};
use grok_shared::checkpoint::{convert, open_model};
use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct Args {
    /// The release's ckpt-0 directory (or a folder holding ckpt-0/ and config.json).
    #[arg(long = "from", env = "GROK_CONVERT_FROM")]
    pub from: PathBuf,
    /// Output directory for the native model (must not exist or be empty).
    #[arg(long, env = "GROK_CONVERT_OUT")]
    pub out: PathBuf,
}

pub fn run(args: Args) -> Result<()> {
    let m = open_model(&args.from).with_context(|| format!("opening {}", args.from.display()))?;
    let mut bar = Bar::new("convert");
    let report = convert::convert(m.source.as_ref(), &m.config, &args.out, &mut |p| {
        bar.update(&p)
    })
    .with_context(|| {
        format!(
            "converting {} into {}",
            args.from.display(),
            args.out.display()
        )
    })?;
    bar.finish();
    eprintln!("{}", crate::progress::summary(&report));
    Ok(())
}
