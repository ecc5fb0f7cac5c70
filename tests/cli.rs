//! End-to-end tests of the `grok` command on the release fixture and the built-in preset.

use grok_shared::test_support::{max_abs_diff, read_logits_file, write_token_rows, TinyAExpected};
use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn grok(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_grok"))
        .args(args)
        .env(
            "GROK_CACHE_DIR",
            Path::new(env!("CARGO_TARGET_TMPDIR")).join("grok-cache"),
        )
        .output()
        .expect("running grok")
}

fn ok(args: &[&str]) -> String {
    let o = grok(args);
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(o.status.success(), "grok {args:?} failed: {err}");
    String::from_utf8(o.stdout).expect("utf-8 stdout")
}

/// Runs a command that must fail cleanly: non-zero exit, an error message, no panic.
fn fails(args: &[&str]) -> String {
    let o = grok(args);
    let err = String::from_utf8_lossy(&o.stderr).to_string();
    assert!(!o.status.success(), "grok {args:?} should fail");
    assert!(!err.contains("panicked"), "grok {args:?} panicked: {err}");
    assert!(
        err.contains("error"),
        "grok {args:?}: no error message: {err}"
    );
    err
}

fn reference() -> PathBuf {
    grok_shared::test_support::reference_dir()
}

fn fixture() -> PathBuf {
    grok_shared::test_support::tiny_a_dir()
}

fn tmp(name: &str) -> PathBuf {
    let p = Path::new(env!("CARGO_TARGET_TMPDIR")).join(name);
    let _ = std::fs::remove_dir_all(&p);
    let _ = std::fs::remove_file(&p);
    p
}

/// `grok logits` and `grok generate --print-ids` on `model` reproduce the fixture.
fn check_model_dir(model: &Path, tag: &str) -> Vec<f32> {
    let e = TinyAExpected::load();
    let tg = e.t + 6;
    let input = tmp(&format!("{tag}-tokens.safetensors"));
    let output = tmp(&format!("{tag}-logits.safetensors"));
    write_token_rows(&input, e.b, tg, &e.greedy);
    let m = model.to_str().unwrap();
    ok(&[
        "logits",
        "--model",
        m,
        "--input",
        input.to_str().unwrap(),
        "--output",
        output.to_str().unwrap(),
    ]);
    let (shape, logits) = read_logits_file(&output);
    assert_eq!(shape, vec![e.b, tg, e.vocab]);
    let worst = max_abs_diff(&logits, &e.logits_f32);
    assert!(
        worst <= 2e-3,
        "{tag}: max |logits - logits_f32_reference| = {worst}"
    );
    for b in 0..e.b {
        let prompt: Vec<String> = e.greedy[b * tg..b * tg + e.t]
            .iter()
            .map(|v| v.to_string())
            .collect();
        let out = ok(&[
            "generate",
            "--model",
            m,
            "--prompt-ids",
            &prompt.join(","),
            "--max-tokens",
            "6",
            "--print-ids",
        ]);
        let want: Vec<String> = e.greedy[b * tg + e.t..(b + 1) * tg]
            .iter()
            .map(|v| v.to_string())
            .collect();
        assert_eq!(out.trim(), want.join(" "), "{tag}: greedy row {b}");
    }
    logits
}

#[test]
fn fixture_through_cli_from_ckpt0_and_after_convert() {
    let from_ckpt = check_model_dir(&fixture(), "ckpt0");
    let native = tmp("tiny-a-native");
    ok(&[
        "convert",
        "--from",
        fixture().to_str().unwrap(),
        "--out",
        native.to_str().unwrap(),
    ]);
    let from_native = check_model_dir(&native, "native");
    assert_eq!(
        from_ckpt, from_native,
        "converted model must compute identical logits"
    );
    // Converting into a non-empty directory is refused.
    let err = fails(&[
        "convert",
        "--from",
        fixture().to_str().unwrap(),
        "--out",
        native.to_str().unwrap(),
    ]);
    assert!(err.contains(native.to_str().unwrap()), "{err}");
}

#[test]
fn tiny_preset_generates_text_reproducibly() {
    let args = [
        "generate",
        "--preset",
        "tiny",
        "--prompt",
        "The answer to life",
        "--max-tokens",
        "12",
    ];
    let a = ok(&[&args[..], &["--temperature", "0.8", "--seed", "7"]].concat());
    let b = ok(&[&args[..], &["--temperature", "0.8", "--seed", "7"]].concat());
    assert_eq!(a, b, "same seed, same text");
    assert!(!a.trim().is_empty());
    let ids = ok(&[&args[..], &["--print-ids"]].concat());
    let parsed: Vec<u32> = ids
        .split_whitespace()
        .map(|t| t.parse::<u32>().expect("an id"))
        .collect();
    let n = parsed.len();
    assert!((1..=12).contains(&n), "{ids}");
}

#[test]
fn tokenize_matches_reference_vectors() {
    let text = std::fs::read_to_string(reference().join("grok1/tokenizer-vectors.jsonl")).unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_grok"))
        .args([
            "tokenize",
            "--tokenizer",
            reference().join("grok1/tokenizer.model").to_str().unwrap(),
        ])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let input = text.clone();
    let writer =
        std::thread::spawn(move || std::io::Write::write_all(&mut stdin, input.as_bytes()));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    let got: Vec<serde_json::Value> = String::from_utf8(out.stdout)
        .unwrap()
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    let want: Vec<serde_json::Value> = text
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(got.len(), want.len());
    for (g, w) in got.iter().zip(&want) {
        assert_eq!(g["ids"], w["ids"], "text {:?}", w["text"]);
    }
}

#[test]
fn bad_input_gets_clear_errors() {
    let f = fixture();
    let m = f.to_str().unwrap();
    let err = fails(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        "1,2",
        "--top-p",
        "1.5",
        "--print-ids",
    ]);
    assert!(err.contains("top_p"), "{err}");
    let err = fails(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        "1,2",
        "--temperature=-1",
        "--print-ids",
    ]);
    assert!(err.contains("temperature"), "{err}");
    let err = fails(&[
        "generate",
        "--model",
        m,
        "--prompt-ids",
        "1,99999",
        "--print-ids",
    ]);
    assert!(err.contains("99999"), "{err}");
    let err = fails(&[
        "generate",
        "--model",
        "/nonexistent/model",
        "--prompt-ids",
        "1",
        "--print-ids",
    ]);
    assert!(err.contains("/nonexistent/model"), "{err}");
    // Both or neither of --model / --preset: clap's own usage error.
    let o = grok(&["generate", "--prompt", "x"]);
    assert!(!o.status.success());
    // logits: wrong dtype and missing tensor in the input file.
    let bad = tmp("bad-tokens.safetensors");
    let data = vec![0u8; 8];
    let view =
        safetensors::tensor::TensorView::new(safetensors::Dtype::F32, vec![1, 2], &data).unwrap();
    safetensors::serialize_to_file([("tokens", view)], None, &bad).unwrap();
    let out = tmp("bad-out.safetensors");
    let err = fails(&[
        "logits",
        "--model",
        m,
        "--input",
        bad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("int32"), "{err}");
    std::fs::write(&bad, b"not a safetensors file").unwrap();
    let err = fails(&[
        "logits",
        "--model",
        m,
        "--input",
        bad.to_str().unwrap(),
        "--output",
        out.to_str().unwrap(),
    ]);
    assert!(err.contains("safetensors"), "{err}");
    // tokenize: a line that is not the expected JSON names the line.
    let mut child = Command::new(env!("CARGO_BIN_EXE_grok"))
        .arg("tokenize")
        .stdin(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::io::Write::write_all(
        &mut child.stdin.take().unwrap(),
        b"{\"text\": \"ok\"}\n{\"txt\": 1}\n",
    )
    .unwrap();
    let o = child.wait_with_output().unwrap();
    assert!(!o.status.success());
    assert!(String::from_utf8_lossy(&o.stderr).contains("line 2"));
    // serve: a grace period that is not a number of seconds, refused before anything starts.
    for bad in ["-1", "inf", "NaN", "1e9"] {
        let grace = format!("--shutdown-grace={bad}");
        let err = fails(&["serve", "--model", m, "--workers", "1", &grace]);
        assert!(err.contains("--shutdown-grace must be"), "{bad}: {err}");
    }
}

#[test]
fn truncated_checkpoint_file_is_named_in_the_error() {
    let dir = tmp("truncated-ckpt");
    std::fs::create_dir_all(dir.join("ckpt-0")).unwrap();
    std::fs::copy(fixture().join("config.json"), dir.join("config.json")).unwrap();
    for entry in std::fs::read_dir(fixture().join("ckpt-0")).unwrap() {
        let p = entry.unwrap().path();
        std::fs::copy(&p, dir.join("ckpt-0").join(p.file_name().unwrap())).unwrap();
    }
    let victim = dir.join("ckpt-0/tensor00003_000");
    let bytes = std::fs::read(&victim).unwrap();
    std::fs::write(&victim, &bytes[..bytes.len() / 2]).unwrap();
    let err = fails(&[
        "generate",
        "--model",
        dir.to_str().unwrap(),
        "--prompt-ids",
        "1",
        "--print-ids",
    ]);
    assert!(err.contains("tensor00003_000"), "{err}");
}

#[test]
fn kv_cache_flags_are_checked_with_the_fix() {
    let f = fixture();
    let base = [
        "generate",
        "--model",
        f.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--print-ids",
        "--workers",
        "1",
    ];
    let err = fails(&[&base[..], &["--block-size", "0"]].concat());
    assert!(err.contains("--block-size must be at least 1"), "{err}");
    let err = fails(&[&base[..], &["--block-size", "4096"]].concat());
    assert!(err.contains("context of 256 positions"), "{err}");
    let err = fails(&[&base[..], &["--kv-cache-mb", "0"]].concat());
    assert!(err.contains("--kv-cache-mb must be at least 1"), "{err}");
    // The fixture's weights with a long context: one full context needs 3 layers × 65536
    // positions × 128 × keys and values × 4 bytes = 192 MiB per worker.
    let long = tmp("long-context-model");
    std::fs::create_dir_all(&long).unwrap();
    std::os::unix::fs::symlink(fixture().join("ckpt-0"), long.join("ckpt-0")).unwrap();
    let mut cfg: serde_json::Value =
        serde_json::from_slice(&std::fs::read(fixture().join("config.json")).unwrap()).unwrap();
    cfg["max_seq_len"] = 65536.into();
    std::fs::write(long.join("config.json"), cfg.to_string()).unwrap();
    let long_args = [
        "generate",
        "--model",
        long.to_str().unwrap(),
        "--prompt-ids",
        "1,2",
        "--print-ids",
        "--workers",
        "1",
    ];
    let err = fails(&[&long_args[..], &["--kv-cache-mb", "100"]].concat());
    assert!(err.contains("give --kv-cache-mb 192 or more"), "{err}");
    // The environment sets the flag too.
    let o = Command::new(env!("CARGO_BIN_EXE_grok"))
        .args(long_args)
        .env("GROK_KV_CACHE_MB", "191")
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&o.stderr);
    assert!(
        !o.status.success() && err.contains("--kv-cache-mb 191 holds"),
        "{err}"
    );
}
