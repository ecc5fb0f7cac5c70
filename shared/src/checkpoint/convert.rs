//! Any [`TensorSource`] (the release's `ckpt-0`, or another native directory) → a native model
//! directory, streaming the source's mapped bytes in bounded chunks.

use super::layout::{expected_tensors, ExpectedTensor, TensorKind};
use super::native::{
    check_output_dir, NativeSource, NativeWriter, TensorSpec, WrittenFile, SCALES_SUFFIX,
    WEIGHT_SUFFIX,
};
use super::{validate, CheckpointError, DType, Result, StoredTensor, TensorSource};
use crate::config::ModelConfig;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// Bytes handed to the writer (and between progress reports) at a time.
pub const CHUNK_BYTES: usize = 64 << 20;

/// Progress of a conversion or random init, for a progress bar.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ConvertProgress {
    /// Payload bytes written so far / in all.
    pub bytes_done: u64,
    pub bytes_total: u64,
    /// Release tensors (a quantized pair counts once) completed so far / in all.
    pub tensors_done: usize,
    pub tensors_total: usize,
    /// The release name of the tensor being written.
    pub tensor: String,
}

/// What a conversion or random init wrote.
#[derive(Debug, Clone)]
pub struct ConvertReport {
    pub out_dir: PathBuf,
    /// Shards with sizes and digests, as in `checksums.json`.
    pub files: Vec<WrittenFile>,
    /// Release tensors written.
    pub tensors: usize,
    /// Payload bytes written (headers excluded).
    pub bytes: u64,
    pub elapsed: Duration,
}

/// The stored arrays of one release tensor, in file order: `X` itself, or `X.weight`, `X.scales`.
pub(crate) fn stored_specs(
    e: &ExpectedTensor,
    plain: DType,
    weight: DType,
    scales: DType,
) -> Vec<TensorSpec> {
    match e.kind {
        TensorKind::Plain => vec![TensorSpec::new(&e.name, plain, e.shape.clone())],
        TensorKind::Quantized { .. } => vec![
            TensorSpec::new(
                format!("{}{WEIGHT_SUFFIX}", e.name),
                weight,
                e.shape.clone(),
            ),
            TensorSpec::new(
                format!("{}{SCALES_SUFFIX}", e.name),
                scales,
                e.scales_shape().unwrap_or_default(),
            ),
        ],
    }
}

/// Converts `source` (validated against `cfg` first) into a native directory at `out`, which
/// must not exist or be empty. Tensors keep their stored dtypes and bytes (int8 stays int8).
pub fn convert(
    source: &dyn TensorSource,
    cfg: &ModelConfig,
    out: &Path,
    progress: &mut dyn FnMut(ConvertProgress),
) -> Result<ConvertReport> {
    let start = Instant::now();
    // Fail before the (possibly long) validation if the destination is unusable.
    check_output_dir(out)?;
    validate(source, cfg)?;
    let expected = expected_tensors(cfg);
    let mut specs = Vec::new();
    for e in &expected {
        match source.load(&e.name)? {
            StoredTensor::Plain(t) => specs.extend(stored_specs(e, t.dtype, t.dtype, t.dtype)),
            StoredTensor::Quantized { weight, scales } => {
                specs.extend(stored_specs(e, weight.dtype, weight.dtype, scales.dtype))
            }
        }
    }
    let mut w = NativeWriter::create(out, cfg, &specs)?;
    let total = w.total_bytes();
    let mut report = |w: &NativeWriter, done: usize, name: &str| {
        progress(ConvertProgress {
            bytes_done: w.bytes_written(),
            bytes_total: total,
            tensors_done: done,
            tensors_total: expected.len(),
            tensor: name.to_string(),
        })
    };
    let mut spec_i = 0;
    for (i, e) in expected.iter().enumerate() {
        report(&w, i, &e.name);
        let t = source.load(&e.name)?;
        let parts = match &t {
            StoredTensor::Plain(a) => vec![a],
            StoredTensor::Quantized { weight, scales } => vec![weight, scales],
        };
        for a in parts {
            // The source could in principle change between the two loads; the writer's headers
            // were computed from the first.
            let spec = specs.get(spec_i);
            if spec.is_none_or(|s| s.dtype != a.dtype || s.shape != a.shape) {
                return Err(CheckpointError::Format {
                    file: source.origin().to_path_buf(),
                    msg: format!("tensor '{}' changed while converting", e.name),
                });
            }
            spec_i += 1;
            for chunk in a.data.as_slice().chunks(CHUNK_BYTES) {
                w.write_chunk(chunk)?;
                report(&w, i, &e.name);
            }
        }
    }
    finish(w, cfg, out, expected.len(), start, progress)
}

/// Completes a conversion or random init: closes the writer (renaming the shards, writing
/// `config.json` and `checksums.json`), reports the last progress, re-reads the headers as a
/// cheap self-check (the digests were computed while writing), and sums up.
pub(crate) fn finish(
    w: NativeWriter,
    cfg: &ModelConfig,
    out: &Path,
    tensors: usize,
    start: Instant,
    progress: &mut dyn FnMut(ConvertProgress),
) -> Result<ConvertReport> {
    let (bytes, total) = (w.bytes_written(), w.total_bytes());
    let files = w.finish()?;
    progress(ConvertProgress {
        bytes_done: bytes,
        bytes_total: total,
        tensors_done: tensors,
        tensors_total: tensors,
        tensor: String::new(),
    });
    validate(&NativeSource::open_unverified(out)?, cfg)?;
    Ok(ConvertReport {
        out_dir: out.to_path_buf(),
        files,
        tensors,
        bytes,
        elapsed: start.elapsed(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{init::init_random, open_model};

    fn small_cfg() -> ModelConfig {
        let mut c = ModelConfig::tiny();
        c.num_hidden_layers = 2;
        c.vocab_size = 512;
        c.hidden_size = 64;
        c.head_dim = 16;
        c.num_attention_heads = 4;
        c.num_key_value_heads = 2;
        c.intermediate_size = 96;
        c
    }

    fn assert_same_tensors(a: &dyn TensorSource, b: &dyn TensorSource, cfg: &ModelConfig) {
        assert_eq!(a.names(), b.names());
        for e in expected_tensors(cfg) {
            match (a.load(&e.name).unwrap(), b.load(&e.name).unwrap()) {
                (StoredTensor::Plain(x), StoredTensor::Plain(y)) => {
                    assert_eq!((x.dtype, &x.shape), (y.dtype, &y.shape), "{}", e.name);
                    assert!(x.data.as_slice() == y.data.as_slice(), "{}", e.name);
                }
                (
                    StoredTensor::Quantized {
                        weight: w1,
                        scales: s1,
                    },
                    StoredTensor::Quantized {
                        weight: w2,
                        scales: s2,
                    },
                ) => {
                    assert_eq!((w1.dtype, &w1.shape), (w2.dtype, &w2.shape), "{}", e.name);
                    assert_eq!((s1.dtype, &s1.shape), (s2.dtype, &s2.shape), "{}", e.name);
                    assert!(w1.data.as_slice() == w2.data.as_slice(), "{}", e.name);
                    assert!(s1.data.as_slice() == s2.data.as_slice(), "{}", e.name);
                }
                _ => panic!("{}: kinds differ", e.name),
            }
        }
    }

    #[test]
    fn native_to_native_round_trip_with_progress() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let a = tmp.path().join("a");
        init_random(&cfg, 7, &a, &mut |_| {}).unwrap();
        let src = open_model(&a).unwrap();
        let b = tmp.path().join("b");
        let mut last = None;
        let mut calls = 0;
        let rep = convert(src.source.as_ref(), &cfg, &b, &mut |p| {
            calls += 1;
            assert!(p.bytes_done <= p.bytes_total);
            last = Some(p);
        })
        .unwrap();
        let last = last.unwrap();
        assert_eq!(last.bytes_done, last.bytes_total);
        assert_eq!(last.tensors_done, expected_tensors(&cfg).len());
        assert!(calls > expected_tensors(&cfg).len());
        assert_eq!(rep.bytes, last.bytes_total);
        let out = open_model(&b).unwrap();
        assert_eq!(out.config, cfg);
        assert_same_tensors(src.source.as_ref(), out.source.as_ref(), &cfg);
        // Same bytes in, same layout out: identical files.
        let digests = |d: &Path| std::fs::read_to_string(d.join("checksums.json")).unwrap();
        assert_eq!(digests(&a), digests(&b));
    }

    #[test]
    fn refuses_non_empty_output_and_mismatched_source() {
        let tmp = tempfile::tempdir().unwrap();
        let cfg = small_cfg();
        let a = tmp.path().join("a");
        init_random(&cfg, 1, &a, &mut |_| {}).unwrap();
        let src = open_model(&a).unwrap();
        let out = tmp.path().join("out");
        std::fs::create_dir(&out).unwrap();
        std::fs::write(out.join("keep.txt"), b"precious").unwrap();
        let e = convert(src.source.as_ref(), &cfg, &out, &mut |_| {}).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
        assert_eq!(std::fs::read(out.join("keep.txt")).unwrap(), b"precious");
        // A config the source does not match: nothing is written.
        let mut other = cfg.clone();
        other.num_hidden_layers = 3;
        let out2 = tmp.path().join("out2");
        let e = convert(src.source.as_ref(), &other, &out2, &mut |_| {}).unwrap_err();
        assert!(matches!(e, CheckpointError::Mismatch { .. }), "{e}");
        assert!(!out2.exists());
    }

    /// ckpt-0 fixture → native: every tensor's bytes equal the source's.
    #[test]
    fn converts_release_fixture() {
        let src = open_model(&crate::test_support::tiny_a_dir()).unwrap();
        let tmp = tempfile::tempdir().unwrap();
        let out = tmp.path().join("native");
        let rep = convert(src.source.as_ref(), &src.config, &out, &mut |_| {}).unwrap();
        assert_eq!(rep.tensors, expected_tensors(&src.config).len());
        let native = open_model(&out).unwrap();
        assert_eq!(native.config, src.config);
        assert_same_tensors(src.source.as_ref(), native.source.as_ref(), &src.config);
    }
}
