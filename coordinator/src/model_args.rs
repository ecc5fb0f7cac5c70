//! Where a command's model comes from: a model directory (native or release `ckpt-0`) or a
//! built-in preset with deterministic random weights, materialised once in a cache folder.

use anyhow::{Context, Result};
use grok_shared::checkpoint::{self, init, ModelDir};
use grok_shared::config::ModelConfig;
use grok_shared::cpu::CpuModel;
use grok_shared::model::ModelWeights;
use grok_shared::tokenizer::Tokenizer;
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct ModelArgs {
    /// Model directory: native (config.json + safetensors + checksums.json) or the release's
    /// ckpt-0 (or a folder holding ckpt-0/ and config.json).
    #[arg(
        long,
        env = "GROK_MODEL",
        required_unless_present = "preset",
        conflicts_with = "preset"
    )]
    pub model: Option<PathBuf>,
    /// A built-in model with deterministic random weights (no download).
    #[arg(long, env = "GROK_PRESET", value_parser = ["tiny"])]
    pub preset: Option<String>,
}

#[derive(clap::Args, Debug, Clone)]
pub struct TokenizerArgs {
    /// SentencePiece `tokenizer.model`; defaults to the released Grok-1 tokenizer built in.
    #[arg(long, env = "GROK_TOKENIZER")]
    pub tokenizer: Option<PathBuf>,
}

impl TokenizerArgs {
    pub fn load(&self) -> Result<Tokenizer> {
        match &self.tokenizer {
            Some(p) => Tokenizer::from_file(p)
                .with_context(|| format!("loading tokenizer {}", p.display())),
            None => Tokenizer::builtin().context("loading the built-in tokenizer"),
        }
    }
}

/// Seed of the preset weights: fixed, so `--preset tiny` is the same model everywhere.
const PRESET_SEED: u64 = 0;

fn cache_root() -> PathBuf {
    if let Some(p) = std::env::var_os("GROK_CACHE_DIR") {
        return PathBuf::from(p);
    }
    if let Some(p) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(p).join("grok");
    }
    match std::env::var_os("HOME") {
        Some(h) => PathBuf::from(h).join(".cache/grok"),
        None => std::env::temp_dir().join("grok-cache"),
    }
}

/// The preset's model directory, written on first use (into a temporary folder renamed into
/// place, so an interrupted write is never mistaken for a model).
pub fn preset_dir(name: &str) -> Result<PathBuf> {
    let cfg = ModelConfig::preset(name)?;
    let dir = cache_root().join(format!("preset-{name}-seed{PRESET_SEED}"));
    if dir.join(checkpoint::native::CHECKSUMS_FILE).is_file() {
        return Ok(dir);
    }
    let parent = cache_root();
    std::fs::create_dir_all(&parent)
        .with_context(|| format!("creating cache folder {}", parent.display()))?;
    let tmp = parent.join(format!(".preset-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&tmp);
    eprintln!(
        "writing the '{name}' preset's random weights to {} (once)",
        dir.display()
    );
    let mut bar = crate::progress::Bar::new("init");
    init::init_random(&cfg, PRESET_SEED, &tmp, &mut |p| bar.update(&p))
        .with_context(|| format!("writing preset weights to {}", tmp.display()))?;
    bar.finish();
    match std::fs::rename(&tmp, &dir) {
        Ok(()) => Ok(dir),
        // Another process won the race: use its copy.
        Err(_) if dir.join(checkpoint::native::CHECKSUMS_FILE).is_file() => {
            let _ = std::fs::remove_dir_all(&tmp);
            Ok(dir)
        }
        Err(e) => Err(e).with_context(|| format!("moving {} to {}", tmp.display(), dir.display())),
    }
}

impl ModelArgs {
    pub fn dir(&self) -> Result<PathBuf> {
        match (&self.model, &self.preset) {
            (Some(m), _) => Ok(m.clone()),
            (None, Some(p)) => preset_dir(p),
            (None, None) => anyhow::bail!("give --model <dir> or --preset tiny"),
        }
    }

    pub fn open(&self) -> Result<ModelDir> {
        let dir = self.dir()?;
        checkpoint::open_model(&dir).with_context(|| format!("opening model {}", dir.display()))
    }

    /// Loads the model onto the CPU backend.
    pub fn load_cpu(&self) -> Result<CpuModel> {
        let m = self.open()?;
        let weights =
            ModelWeights::load(m.source.as_ref(), &m.config).context("loading weights")?;
        Ok(CpuModel::new(weights)?)
    }
}
