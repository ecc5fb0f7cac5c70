use crate::model_args::TokenizerArgs;
use anyhow::{bail, Context, Result};
use std::io::{BufRead, Write};

#[derive(clap::Args, Debug)]
pub struct Args {
    #[command(flatten)]
    pub tokenizer: TokenizerArgs,
}

#[derive(serde::Deserialize)]
struct Line {
    text: String,
}

pub fn run(args: Args) -> Result<()> {
    let tok = args.tokenizer.load()?;
    let stdin = std::io::stdin().lock();
    let mut out = std::io::BufWriter::new(std::io::stdout().lock());
    for (i, line) in stdin.lines().enumerate() {
        let line = line.with_context(|| format!("reading stdin line {}", i + 1))?;
        if line.trim().is_empty() {
            continue;
        }
        let parsed: Line = match serde_json::from_str(&line) {
            Ok(l) => l,
            Err(e) => bail!(
                "stdin line {}: expected a JSON object {{\"text\": \"...\"}}: {e}",
                i + 1
            ),
        };
        let ids = tok.encode(&parsed.text);
        serde_json::to_writer(&mut out, &serde_json::json!({ "ids": ids }))?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    Ok(())
}
