//! Deterministic random weights for any config, written in the native format with the
//! release's storage types: f32 embeddings, norms and router; int8 weights with bf16 scales
//! (G = 8 scale groups for the K-sharded tensors, 1 otherwise, as `layout.rs` says).
//!
//! Determinism: every stored array gets its own seed from (seed, stored name); its elements
//! are cut into fixed blocks of [`BLOCK_ELEMS`], and block `b` draws from a SplitMix64 seeded
//! from (array seed, b). So the bytes depend only on (seed, config), never on thread count or
//! I/O chunking, and blocks can be generated in parallel. Only integer ops and IEEE-exact f32
//! arithmetic are used (no libm), so the output is the same on every platform. The generator
//! is part of the format of these test models: changing it changes every random model
//! (`golden_digest_is_stable` pins it).
//!
//! Distributions, chosen so activations stay O(1) through many layers:
//! - int8 weights: uniform on [-127, 127] (σ ≈ 73.6);
//! - scales: `1 / (sqrt(K) · 73.6)` × uniform [0.75, 1.25) per entry (jittered so a kernel
//!   that mixes up scale groups or columns gives different numbers), making each dequantised
//!   matrix ≈ σ = 1/sqrt(K): unit-RMS inputs give unit-RMS outputs;
//! - embeddings: ≈ normal with σ = 1 / embedding_multiplier_scale, so the scaled input
//!   embedding has RMS ≈ 1 (and tied output logits have σ ≈ sqrt(d)/scale × output scale);
//! - norm scales: 1 + uniform [-0.1, 0.1);
//! - router: ≈ normal with σ = 1/sqrt(d), giving router logits of σ ≈ 1 (clear top-2 choices).
//!
//! "≈ normal" is the Irwin–Hall sum of four uniforms, rescaled to unit variance (bounded at
//! ±3.46σ, which is fine for weights and avoids transcendental functions).

use super::convert::{finish, stored_specs, ConvertProgress, ConvertReport, CHUNK_BYTES};
use super::layout::{expected_tensors, TensorKind, EMBEDDINGS};
use super::native::{NativeWriter, TensorSpec};
use super::{DType, Result};
use crate::config::ModelConfig;
use rayon::prelude::*;
use std::path::Path;
use std::time::Instant;

/// Elements per independently seeded block (part of the generator's definition).
pub const BLOCK_ELEMS: usize = 1 << 16;

/// Standard deviation of an int8 uniform on [-127, 127].
const SIGMA_INT8: f64 = 73.61;

/// SplitMix64 (Steele, Lea, Flood 2014): tiny, fast, and good enough for weights.
struct SplitMix64(u64);

impl SplitMix64 {
    #[inline]
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        mix64(self.0)
    }

    /// Uniform in [0, 1) with 24 bits.
    #[inline]
    fn unit(&mut self) -> f32 {
        (self.next() >> 40) as f32 * (1.0 / (1u32 << 24) as f32)
    }

    /// Irwin–Hall(4) from the four 16-bit lanes of one draw, rescaled to mean 0, variance 1.
    #[inline]
    fn normalish(&mut self) -> f32 {
        let r = self.next();
        let mut s = 0.0f32;
        for k in 0..4 {
            s += (((r >> (16 * k)) & 0xFFFF) as f32 + 0.5) * (1.0 / 65536.0);
        }
        (s - 2.0) * 1.732_050_8
    }
}

/// SplitMix64's output function (a strong 64-bit mixer).
#[inline]
fn mix64(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xCBF2_9CE4_8422_2325u64, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0000_0100_0000_01B3)
    })
}

fn array_seed(seed: u64, stored_name: &str) -> u64 {
    mix64(seed ^ mix64(fnv1a64(stored_name.as_bytes())))
}

fn block_rng(array_seed: u64, block: u64) -> SplitMix64 {
    SplitMix64(mix64(
        array_seed ^ mix64(block.wrapping_add(0x632B_E59B_D9B4_E019)),
    ))
}

/// Byte b → int8 in [-127, 127] (floor(b·255/256) − 127; one value gets two bytes).
const I8_TABLE: [u8; 256] = {
    let mut t = [0u8; 256];
    let mut b = 0;
    while b < 256 {
        t[b] = (((b * 255) >> 8) as i32 - 127) as i8 as u8;
        b += 1;
    }
    t
};

#[derive(Debug, Clone, Copy)]
enum Dist {
    /// int8 uniform on [-127, 127].
    Int8,
    /// bf16 `base` × U[0.75, 1.25).
    Scales { base: f32 },
    /// f32 ≈ N(0, std²).
    Normal { std: f32 },
    /// f32 1 + U[-0.1, 0.1).
    NormScale,
}

impl Dist {
    fn dtype(self) -> DType {
        match self {
            Dist::Int8 => DType::I8,
            Dist::Scales { .. } => DType::BF16,
            Dist::Normal { .. } | Dist::NormScale => DType::F32,
        }
    }

    /// Fills one block's bytes (whole elements) from its generator.
    fn fill(self, rng: &mut SplitMix64, out: &mut [u8]) {
        match self {
            Dist::Int8 => {
                for c in out.chunks_mut(8) {
                    let r = rng.next().to_le_bytes();
                    for (o, &b) in c.iter_mut().zip(&r) {
                        *o = I8_TABLE[b as usize];
                    }
                }
            }
            Dist::Scales { base } => {
                for c in out.chunks_exact_mut(2) {
                    let v = base * (0.75 + 0.5 * rng.unit());
                    c.copy_from_slice(&half::bf16::from_f32(v).to_bits().to_le_bytes());
                }
            }
            Dist::Normal { std } => {
                for c in out.chunks_exact_mut(4) {
                    c.copy_from_slice(&(std * rng.normalish()).to_le_bytes());
                }
            }
            Dist::NormScale => {
                for c in out.chunks_exact_mut(4) {
                    let v = 1.0 + 0.2 * (rng.unit() - 0.5);
                    c.copy_from_slice(&v.to_le_bytes());
                }
            }
        }
    }
}

/// The stored arrays of `cfg` with the distribution of each.
fn plan(cfg: &ModelConfig) -> Vec<(String, TensorSpec, Dist)> {
    let d = cfg.hidden_size.max(1) as f64;
    let emb_scale = cfg.embedding_multiplier_scale.abs();
    // A degenerate multiplier would give absurd embeddings; fall back to unit variance.
    let emb_std = if emb_scale >= 1e-3 {
        1.0 / emb_scale
    } else {
        1.0
    };
    let mut out = Vec::new();
    for e in expected_tensors(cfg) {
        let specs = stored_specs(&e, DType::F32, DType::I8, DType::BF16);
        let dists: Vec<Dist> = match e.kind {
            TensorKind::Quantized { .. } => {
                let k = e.shape.len().checked_sub(2).and_then(|i| e.shape.get(i));
                let k = k.copied().unwrap_or(1).max(1) as f64;
                let base = (1.0 / (k.sqrt() * SIGMA_INT8)) as f32;
                vec![Dist::Int8, Dist::Scales { base }]
            }
            TensorKind::Plain if e.name == EMBEDDINGS => vec![Dist::Normal { std: emb_std }],
            TensorKind::Plain if e.name.ends_with("router/w") => vec![Dist::Normal {
                std: (1.0 / d.sqrt()) as f32,
            }],
            TensorKind::Plain => vec![Dist::NormScale],
        };
        for (s, dist) in specs.into_iter().zip(dists) {
            debug_assert_eq!(s.dtype, dist.dtype());
            out.push((e.name.clone(), s, dist));
        }
    }
    out
}

/// Fills `buf` with blocks `first_block..` of an array.
fn fill_blocks(dist: Dist, seed: u64, first_block: u64, buf: &mut [u8]) {
    let block_bytes = BLOCK_ELEMS * dist.dtype().size();
    buf.par_chunks_mut(block_bytes)
        .enumerate()
        .for_each(|(j, b)| dist.fill(&mut block_rng(seed, first_block + j as u64), b));
}

/// Writes a random model for `cfg` into `out` (must not exist or be empty). Same seed and
/// config ⇒ byte-identical files. Memory: two chunks of [`CHUNK_BYTES`]; generation of the
/// next chunk overlaps writing the current one.
pub fn init_random(
    cfg: &ModelConfig,
    seed: u64,
    out: &Path,
    progress: &mut dyn FnMut(ConvertProgress),
) -> Result<ConvertReport> {
    let start = Instant::now();
    cfg.validate("init config")?;
    let plan = plan(cfg);
    let specs: Vec<TensorSpec> = plan.iter().map(|(_, s, _)| s.clone()).collect();
    let mut w = NativeWriter::create(out, cfg, &specs)?;
    let total = w.total_bytes();
    let tensors_total = expected_tensors(cfg).len();
    let mut tensors_done = 0;
    let mut cur = Vec::new();
    let mut next = Vec::new();
    for (i, (release_name, spec, dist)) in plan.iter().enumerate() {
        let esize = spec.dtype.size();
        let numel = spec.nbytes().unwrap_or(0) / esize as u64;
        // Whole blocks per chunk, so a chunk boundary never splits a block's generator.
        let chunk_blocks = (CHUNK_BYTES / (BLOCK_ELEMS * esize)).max(1) as u64;
        let chunk_elems = chunk_blocks * BLOCK_ELEMS as u64;
        let n_chunks = numel.div_ceil(chunk_elems);
        let aseed = array_seed(seed, &spec.name);
        let chunk_len =
            |c: u64| ((numel - c * chunk_elems).min(chunk_elems) * esize as u64) as usize;
        if n_chunks > 0 {
            cur.resize(chunk_len(0), 0);
            fill_blocks(*dist, aseed, 0, &mut cur);
        }
        for c in 0..n_chunks {
            let has_next = c + 1 < n_chunks;
            if has_next {
                next.resize(chunk_len(c + 1), 0);
            }
            let (written, ()) = rayon::join(
                || w.write_chunk(&cur),
                || {
                    if has_next {
                        fill_blocks(*dist, aseed, (c + 1) * chunk_blocks, &mut next)
                    }
                },
            );
            written?;
            std::mem::swap(&mut cur, &mut next);
            progress(ConvertProgress {
                bytes_done: w.bytes_written(),
                bytes_total: total,
                tensors_done,
                tensors_total,
                tensor: release_name.clone(),
            });
        }
        // A release tensor is done when its last stored array is.
        if plan.get(i + 1).is_none_or(|(n, _, _)| n != release_name) {
            tensors_done += 1;
        }
    }
    finish(w, cfg, out, tensors_total, start, progress)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::layout::{layer_tensor, FINAL_NORM};
    use crate::checkpoint::{open_model, StoredTensor};

    fn small_cfg() -> ModelConfig {
        let mut c = ModelConfig::tiny();
        c.num_hidden_layers = 2;
        c.vocab_size = 512;
        c
    }

    fn checksums(dir: &Path) -> String {
        std::fs::read_to_string(dir.join("checksums.json")).unwrap()
    }

    #[test]
    fn same_seed_same_bytes_different_seed_different() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let (a, b, c) = (
            tmp.path().join("a"),
            tmp.path().join("b"),
            tmp.path().join("c"),
        );
        let ra = init_random(&cfg, 42, &a, &mut |_| {}).unwrap();
        init_random(&cfg, 42, &b, &mut |_| {}).unwrap();
        init_random(&cfg, 43, &c, &mut |_| {}).unwrap();
        assert_eq!(checksums(&a), checksums(&b));
        for (x, y) in ra.files.iter().zip(
            &crate::checkpoint::native::Checksums::read(&c)
                .unwrap()
                .files,
        ) {
            assert_eq!(&x.name, y.0);
            assert_ne!(x.checksum.xxh3_128, y.1.xxh3_128);
        }
    }

    /// Pins the generator: if this changes, every random model anyone made changes too.
    #[test]
    fn golden_digest_is_stable() {
        let tmp = tempfile::tempdir().unwrap();
        // Every field the weights depend on is spelled out, so preset edits don't move it.
        let cfg = ModelConfig {
            // 2 blocks of embeddings.
            vocab_size: 2048,
            hidden_size: 64,
            head_dim: 16,
            num_attention_heads: 4,
            num_key_value_heads: 2,
            num_hidden_layers: 2,
            intermediate_size: 96,
            num_local_experts: 8,
            num_experts_per_tok: 2,
            embedding_multiplier_scale: 8.0,
            ..ModelConfig::tiny()
        };
        let r = init_random(&cfg, 0, &tmp.path().join("g"), &mut |_| {}).unwrap();
        assert_eq!(r.files.len(), 1);
        assert_eq!(
            r.files[0].checksum.xxh3_128,
            "c073b7f9d0dab3992ac81c81c4901a29"
        );
    }

    #[test]
    fn open_model_accepts_init_and_statistics_are_sane() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let dir = tmp.path().join("m");
        let mut calls = 0;
        let rep = init_random(&cfg, 5, &dir, &mut |p| {
            calls += 1;
            assert!(p.bytes_done <= p.bytes_total && p.tensors_done <= p.tensors_total);
        })
        .unwrap();
        assert!(calls >= rep.tensors);
        let m = open_model(&dir).unwrap();
        assert_eq!(m.config, cfg);
        let plain = |n: &str| match m.source.load(n).unwrap() {
            StoredTensor::Plain(t) => t.to_f32_vec(),
            _ => panic!("{n}"),
        };
        let rms = |v: &[f32]| (v.iter().map(|x| x * x).sum::<f32>() / v.len() as f32).sqrt();
        let emb = plain(EMBEDDINGS);
        let want = 1.0 / cfg.embedding_multiplier_scale;
        assert!((rms(&emb) / want - 1.0).abs() < 0.05, "{}", rms(&emb));
        let norm = plain(FINAL_NORM);
        assert!(norm.iter().all(|&x| (0.9..1.1).contains(&x)));
        let router = plain(&layer_tensor(0, "router/w"));
        let want = 1.0 / (cfg.hidden_size as f32).sqrt();
        assert!((rms(&router) / want - 1.0).abs() < 0.1, "{}", rms(&router));
        // Dequantised matrices have σ ≈ 1/sqrt(K), including the 8-group down projection.
        for (leaf, k) in [
            ("moe/linear/w", cfg.hidden_size),
            ("moe/linear_1/w", cfg.intermediate_size),
            ("multi_head_attention/linear/w", cfg.q_dim()),
        ] {
            let StoredTensor::Quantized { weight, scales } =
                m.source.load(&layer_tensor(1, leaf)).unwrap()
            else {
                panic!()
            };
            let w = weight.to_f32_vec();
            let s = scales.to_f32_vec();
            assert!(w.iter().all(|&x| (-127.0..=127.0).contains(&x)));
            assert!(w.contains(&-127.0) && w.contains(&127.0));
            let (kk, n) = (
                weight.shape[weight.shape.len() - 2],
                weight.shape[weight.shape.len() - 1],
            );
            let g = scales.shape[scales.shape.len() - 2];
            let deq: Vec<f32> = w
                .iter()
                .enumerate()
                .map(|(i, &x)| {
                    let (lead, r) = (i / (kk * n), i % (kk * n));
                    let (row, col) = (r / n, r % n);
                    x * s[(lead * g + row / (kk / g)) * n + col]
                })
                .collect();
            let want = 1.0 / (k as f32).sqrt();
            assert!(
                (rms(&deq) / want - 1.0).abs() < 0.05,
                "{leaf}: {}",
                rms(&deq)
            );
            let mean = w.iter().sum::<f32>() / w.len() as f32;
            assert!(mean.abs() < 1.0, "{leaf}: mean {mean}");
        }
    }

    #[test]
    fn blocks_do_not_depend_on_chunking() {
        // Generating blocks 3.. directly equals the tail of generating 0..
        let d = Dist::Normal { std: 1.0 };
        let bb = BLOCK_ELEMS * 4;
        let mut all = vec![0u8; bb * 5 + 12];
        fill_blocks(d, 9, 0, &mut all);
        let mut tail = vec![0u8; bb * 2 + 12];
        fill_blocks(d, 9, 3, &mut tail);
        assert_eq!(&all[bb * 3..], &tail[..]);
    }
}
