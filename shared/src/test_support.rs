//! Paths to the team's read-only reference folder (`../shared` beside the checkout), for tests.

use std::path::PathBuf;

/// `$GROK_REFERENCE_DIR`, else `../shared` relative to the workspace root.
pub fn reference_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("GROK_REFERENCE_DIR") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The `grok1-tiny-a` fixture directory.
pub fn tiny_a_dir() -> PathBuf {
    reference_dir().join("fixtures/grok1-tiny-a")
}
