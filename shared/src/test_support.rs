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

/// The (workers, tp, ep) plans the distributed runtime must run the `grok1-tiny-a` fixture on.
pub const TINY_A_PLANS: [(usize, usize, usize); 8] = [
    (1, 1, 1),
    (2, 2, 2),
    (2, 1, 2),
    (2, 2, 1),
    (4, 4, 4),
    (4, 2, 4),
    (4, 1, 4),
    (4, 4, 2),
];
