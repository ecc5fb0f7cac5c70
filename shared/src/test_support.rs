//! For tests: paths to the team's read-only reference folder (`../shared` beside the
//! checkout), the `grok1-tiny-a` fixture's expected outputs, tensor comparison, random int8
//! matrices and their f64 product.

use std::path::PathBuf;

/// `$GROK_REFERENCE_DIR`, else `../shared` relative to the workspace root.
pub fn reference_dir() -> PathBuf {
    if let Some(p) = std::env::var_os("GROK_REFERENCE_DIR") {
        return PathBuf::from(p);
    }
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared")
}

/// The CUDA emulator's sources (`shared/tests/cuda_emu`), for the tests of every crate that
/// build it.
pub fn cuda_emulator_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("tests/cuda_emu")
}

/// Set to 1 in a process that runs on the emulated device (shared/tests/cuda_emu).
pub const EMULATED_DEVICE: &str = "GROK_EMULATED_DEVICE";

/// Whether this process runs on the emulated device, kernels on the CPU (GPU tests then
/// take smaller shapes).
pub fn on_emulated_device() -> bool {
    std::env::var(EMULATED_DEVICE).is_ok_and(|v| v == "1")
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

/// What the release's JAX code produced for `grok1-tiny-a` (`expected.safetensors`): `b`
/// prompts of `t` tokens, their logits, and each prompt followed by its greedy continuation.
pub struct TinyAExpected {
    pub b: usize,
    pub t: usize,
    pub vocab: usize,
    /// `b × t` prompt tokens.
    pub tokens: Vec<u32>,
    /// `b × t × vocab` logits of the release run in bf16.
    pub logits_bf16: Vec<f32>,
    /// `b × (t + n)` rows: the prompt, then `n` greedy tokens.
    pub greedy: Vec<u32>,
    /// Logits of the greedy rows computed in f32 by the release's code.
    pub logits_f32: Vec<f32>,
    /// Per greedy position, 1 where no routing decision so far is a near tie (compare
    /// tightly there).
    pub stable: Vec<u8>,
}

impl TinyAExpected {
    /// Reads the fixture; panics naming what is missing (test code: the fixture is given).
    pub fn load() -> TinyAExpected {
        let path = tiny_a_dir().join("expected.safetensors");
        let bytes =
            std::fs::read(&path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
        let st = safetensors::SafeTensors::deserialize(&bytes)
            .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        let tensor = |name: &str| {
            st.tensor(name)
                .unwrap_or_else(|e| panic!("{}: tensor {name}: {e}", path.display()))
        };
        let words = |name: &str| -> Vec<[u8; 4]> {
            tensor(name)
                .data()
                .chunks_exact(4)
                .map(|c| [c[0], c[1], c[2], c[3]])
                .collect()
        };
        let ids = |name: &str| {
            words(name)
                .into_iter()
                .map(|w| i32::from_le_bytes(w) as u32)
        };
        let floats = |name: &str| words(name).into_iter().map(f32::from_le_bytes);
        let shape = tensor("tokens").shape().to_vec();
        TinyAExpected {
            b: shape[0],
            t: shape[1],
            vocab: tensor("logits").shape()[2],
            tokens: ids("tokens").collect(),
            logits_bf16: floats("logits").collect(),
            greedy: ids("greedy_tokens").collect(),
            logits_f32: floats("logits_f32_reference").collect(),
            stable: tensor("stable").data().to_vec(),
        }
    }

    /// Length of each greedy row (prompt and continuation).
    pub fn greedy_len(&self) -> usize {
        self.greedy.len() / self.b
    }
}

/// The largest of `diffs` (0 for none), infinite if any is NaN: `f64::max` returns the other
/// operand when one is NaN, so a plain fold would pass outputs that nobody wrote (NaN on the
/// emulated device) or that are not numbers.
pub fn worst(diffs: impl IntoIterator<Item = f64>) -> f64 {
    diffs.into_iter().fold(
        0.0,
        |a, d| {
            if d.is_nan() {
                f64::INFINITY
            } else {
                a.max(d)
            }
        },
    )
}

/// Largest absolute elementwise difference, infinite where either side is not finite
/// (panics on different lengths).
pub fn max_abs_diff(a: &[f32], b: &[f32]) -> f32 {
    assert_eq!(a.len(), b.len(), "comparing tensors of different sizes");
    worst(a.iter().zip(b).map(|(x, y)| f64::from((x - y).abs()))) as f32
}

/// Writes `ids` (`b` rows of `t` tokens) as the `tokens` file `grok logits --input` reads.
pub fn write_token_rows(path: &std::path::Path, b: usize, t: usize, ids: &[u32]) {
    assert_eq!(ids.len(), b * t, "{b} rows of {t} tokens");
    let data: Vec<u8> = ids.iter().flat_map(|&v| (v as i32).to_le_bytes()).collect();
    let view = safetensors::tensor::TensorView::new(safetensors::Dtype::I32, vec![b, t], &data)
        .expect("a tokens tensor");
    safetensors::serialize_to_file([("tokens", view)], None, path)
        .unwrap_or_else(|e| panic!("cannot write {}: {e}", path.display()));
}

/// The shape and values of the `logits` tensor (f32) of a file `grok logits` wrote.
pub fn read_logits_file(path: &std::path::Path) -> (Vec<usize>, Vec<f32>) {
    let bytes =
        std::fs::read(path).unwrap_or_else(|e| panic!("cannot read {}: {e}", path.display()));
    let st = safetensors::SafeTensors::deserialize(&bytes)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let t = st
        .tensor("logits")
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    assert_eq!(t.dtype(), safetensors::Dtype::F32, "{}", path.display());
    let values = t
        .data()
        .chunks_exact(4)
        .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
        .collect();
    (t.shape().to_vec(), values)
}

/// A deterministic pseudo-random step (an LCG's top bits), so failures reproduce.
pub fn lcg(seed: &mut u64) -> u64 {
    *seed = seed
        .wrapping_mul(6364136223846793005)
        .wrapping_add(1442695040888963407);
    *seed >> 33
}

/// A random int8 `[k, n]` matrix with `groups` scale rows (all int8 values occur).
pub fn random_qmatrix(k: usize, n: usize, groups: usize, seed: u64) -> crate::model::QMatrix {
    let mut s = seed;
    let w: Vec<u8> = (0..k * n).map(|_| (lcg(&mut s) % 255) as u8).collect();
    let scales = (0..groups * n)
        .map(|_| 0.001 + (lcg(&mut s) % 1000) as f32 * 1e-5)
        .collect();
    crate::model::QMatrix {
        k,
        n,
        group_rows: k / groups,
        weight: crate::bytes::ByteView::from_vec(w),
        scales,
    }
}

/// `x[m, k] · w`, dequantised, accumulated in f64: the reference for the int8 matmuls.
pub fn qmatmul_reference(x: &[f32], m: usize, w: &crate::model::QMatrix) -> Vec<f64> {
    let d = w.dequantize();
    let mut out = vec![0f64; m * w.n];
    for r in 0..m {
        for kk in 0..w.k {
            let xv = x[r * w.k + kk] as f64;
            let row = &d[kk * w.n..(kk + 1) * w.n];
            for (o, &dv) in out[r * w.n..(r + 1) * w.n].iter_mut().zip(row) {
                *o += xv * dv as f64;
            }
        }
    }
    out
}

/// The `grok1-tiny-a` fixture's greedy continuation of `prompt` by `n` tokens with the
/// penalties and bias of `adjust` (its `counts` ignored: kept here from the tokens chosen),
/// computed step by step on the CPU model: what a server must generate for such a request.
pub fn tiny_a_greedy_adjusted(
    prompt: &[u32],
    n: usize,
    adjust: &crate::sampling::LogitAdjust,
) -> Vec<u32> {
    use crate::model::{LogitsMode, ModelWeights, SeqKv};
    let dir = crate::checkpoint::open_model(&tiny_a_dir()).expect("the fixture");
    let weights = ModelWeights::load(dir.source.as_ref(), &dir.config).expect("its weights");
    let model = crate::cpu::CpuModel::new(weights).expect("the model");
    let mut kv = SeqKv::new(&model);
    let mut logits = kv
        .step(&model, prompt, LogitsMode::Last)
        .expect("the prompt");
    let mut counts = std::collections::BTreeMap::<u32, u32>::new();
    let mut out = Vec::new();
    for _ in 0..n {
        let step = crate::sampling::LogitAdjust {
            counts: counts.iter().map(|(&t, &c)| (t, c)).collect(),
            ..adjust.clone()
        };
        step.apply(&mut logits);
        let t = crate::sampling::argmax(&logits).expect("a token") as u32;
        *counts.entry(t).or_insert(0) += 1;
        out.push(t);
        logits = kv.step(&model, &[t], LogitsMode::Last).expect("a step");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_difference_that_is_not_a_number_is_the_worst() {
        assert_eq!(max_abs_diff(&[1.0, 2.0], &[1.5, 2.0]), 0.5);
        assert_eq!(max_abs_diff(&[1.0, f32::NAN], &[1.0, 2.0]), f32::INFINITY);
        assert_eq!(max_abs_diff(&[f32::NAN, 1.0], &[2.0, 1.0]), f32::INFINITY);
        assert_eq!(
            max_abs_diff(&[1.0, 2.0], &[1.0, f32::INFINITY]),
            f32::INFINITY
        );
        assert_eq!(worst([0.5, f64::NAN, 0.25]), f64::INFINITY);
        assert_eq!(worst([]), 0.0);
    }
}
