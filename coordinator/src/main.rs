//! `grok`: the Grok-1 command line. Model tools (generate, logits, tokenize, convert, init)
//! run in this process; the cluster coordinator builds on the same commands.

mod cluster_args;
mod commands;
mod model_args;
mod progress;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(
    name = "grok",
    version,
    about = "Grok-1 inference: serve a cluster, generate, load-test, run batches, convert checkpoints"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Generate a continuation of a prompt.
    Generate(commands::generate::Args),
    /// Compute the logits of every position of token sequences (one causal forward per row).
    Logits(commands::logits::Args),
    /// Tokenize JSON lines `{"text": ...}` from stdin into `{"ids": [...]}` lines on stdout.
    Tokenize(commands::tokenize::Args),
    /// Convert the release's ckpt-0 directory into the native safetensors format.
    Convert(commands::convert::Args),
    /// Write a model with deterministic random weights for a preset shape.
    Init(commands::init::Args),
    /// Start a cluster of workers and supervise it (restarting a failed rank).
    Serve(commands::serve::Args),
    /// Load-test a server: `grok bench serve --url URL --rate R | --concurrency C ...`.
    Bench(commands::bench::Args),
    /// Run an OpenAI Batch file (JSON lines) against a server or a cluster started here.
    Batch(commands::batch::Args),
}

/// See the workspace Cargo.toml: tensor-sized buffers are reused instead of refaulted.
#[global_allocator]
static GLOBAL: mimalloc::MiMalloc = mimalloc::MiMalloc;

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_writer(std::io::stderr)
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("warn")),
        )
        .init();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Generate(a) => commands::generate::run(a),
        Command::Logits(a) => commands::logits::run(a),
        Command::Tokenize(a) => commands::tokenize::run(a),
        Command::Convert(a) => commands::convert::run(a),
        Command::Init(a) => commands::init::run(a),
        Command::Serve(a) => commands::serve::run(a),
        Command::Bench(a) => commands::bench::run(a),
        Command::Batch(a) => commands::batch::run(a),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}
