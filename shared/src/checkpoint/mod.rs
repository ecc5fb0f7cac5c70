//! Checkpoints: the release's `ckpt-0/` pickles and our native safetensors format, both
//! presented as a [`TensorSource`] of [`StoredTensor`]s that view memory-mapped bytes.

pub mod ckpt0;
pub mod convert;
pub mod init;
pub mod layout;
pub mod native;
pub mod pickle;

use crate::bytes::ByteView;
use crate::config::ModelConfig;
use std::path::{Path, PathBuf};

pub use layout::{expected_tensors, ExpectedTensor, TensorKind};

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    /// The pickle interpreter met something it does not accept (or ran out of bytes).
    #[error("{file}: at byte {offset}: {msg}")]
    Pickle {
        file: PathBuf,
        offset: usize,
        msg: String,
    },
    /// A file that parsed but does not hold what it should.
    #[error("{file}: {msg}")]
    Format { file: PathBuf, msg: String },
    #[error("{file}: checksum mismatch (expected {expected}, found {actual}): the file is corrupted or was modified after conversion")]
    Checksum {
        file: PathBuf,
        expected: String,
        actual: String,
    },
    #[error("{origin}: no tensor named '{name}'")]
    MissingTensor { origin: PathBuf, name: String },
    /// The checkpoint does not match the config; every mismatch is listed.
    #[error("{origin} does not match the model config ({} problem(s)):\n  {}", problems.len(), problems.join("\n  "))]
    Mismatch {
        origin: PathBuf,
        problems: Vec<String>,
    },
    #[error("{path}: not a model directory: expected a native model (config.json + *.safetensors + checksums.json) or a release checkpoint (ckpt-0/ with tensor00000_000 ...)")]
    NotAModel { path: PathBuf },
    #[error(transparent)]
    Config(#[from] crate::config::ConfigError),
}

pub type Result<T> = std::result::Result<T, CheckpointError>;

/// Element types a checkpoint may store.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DType {
    F32,
    BF16,
    F16,
    I8,
    U8,
    I32,
}

impl DType {
    pub fn size(self) -> usize {
        match self {
            DType::F32 | DType::I32 => 4,
            DType::BF16 | DType::F16 => 2,
            DType::I8 | DType::U8 => 1,
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            DType::F32 => "float32",
            DType::BF16 => "bfloat16",
            DType::F16 => "float16",
            DType::I8 => "int8",
            DType::U8 => "uint8",
            DType::I32 => "int32",
        }
    }

    pub fn is_float(self) -> bool {
        matches!(self, DType::F32 | DType::BF16 | DType::F16)
    }
}

impl std::fmt::Display for DType {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

/// A dense row-major little-endian array viewing checkpoint bytes.
#[derive(Debug, Clone)]
pub struct RawTensor {
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub data: ByteView,
}

impl RawTensor {
    /// Checks that `data` holds exactly `shape` elements of `dtype`.
    pub fn new(
        dtype: DType,
        shape: Vec<usize>,
        data: ByteView,
    ) -> std::result::Result<Self, String> {
        let numel = shape
            .iter()
            .try_fold(1usize, |a, &d| a.checked_mul(d))
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
        let want = numel
            .checked_mul(dtype.size())
            .ok_or_else(|| format!("shape {shape:?} overflows"))?;
        if want != data.len() {
            return Err(format!(
                "{dtype} array of shape {shape:?} needs {want} bytes but has {}",
                data.len()
            ));
        }
        Ok(RawTensor { dtype, shape, data })
    }

    pub fn numel(&self) -> usize {
        self.shape.iter().product()
    }

    /// Values as f32 (exact for f32, bf16 and f16; integers converted).
    pub fn to_f32_vec(&self) -> Vec<f32> {
        let b = self.data.as_slice();
        match self.dtype {
            DType::F32 => b
                .chunks_exact(4)
                .map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]]))
                .collect(),
            DType::BF16 => b
                .chunks_exact(2)
                .map(|c| half::bf16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::F16 => b
                .chunks_exact(2)
                .map(|c| half::f16::from_bits(u16::from_le_bytes([c[0], c[1]])).to_f32())
                .collect(),
            DType::I8 => b.iter().map(|&x| x as i8 as f32).collect(),
            DType::U8 => b.iter().map(|&x| x as f32).collect(),
            DType::I32 => b
                .chunks_exact(4)
                .map(|c| i32::from_le_bytes([c[0], c[1], c[2], c[3]]) as f32)
                .collect(),
        }
    }

    /// The sub-array `[start, start+len)` along `axis`. Zero-copy when the result is one
    /// contiguous run of bytes (a leading index, or a row range); copies the strided parts
    /// otherwise (a column slice), touching only those bytes.
    pub fn narrow(&self, axis: usize, start: usize, len: usize) -> Option<RawTensor> {
        let dim = *self.shape.get(axis)?;
        if start.checked_add(len)? > dim {
            return None;
        }
        let outer: usize = self.shape[..axis].iter().product();
        let inner: usize = self.shape[axis + 1..].iter().product::<usize>() * self.dtype.size();
        let mut shape = self.shape.clone();
        shape[axis] = len;
        let data = if outer == 1 || len == dim {
            let off = if outer == 1 { start * inner } else { 0 };
            let n = if outer == 1 {
                len * inner
            } else {
                self.data.len()
            };
            self.data.slice(off..off + n)?
        } else {
            let src = self.data.as_slice();
            let mut out = Vec::with_capacity(outer * len * inner);
            for o in 0..outer {
                let base = (o * dim + start) * inner;
                out.extend_from_slice(&src[base..base + len * inner]);
            }
            ByteView::from_vec(out)
        };
        Some(RawTensor {
            dtype: self.dtype,
            shape,
            data,
        })
    }
}

/// One named entry of a checkpoint.
#[derive(Debug, Clone)]
pub enum StoredTensor {
    Plain(RawTensor),
    /// The release's `QuantizedWeight8bit`: int8 `weight [*lead, K, N]` and `scales [*lead, G, N]`;
    /// `w[..., k, n] = weight[..., k, n] * scales[..., k / (K/G), n]`.
    Quantized {
        weight: RawTensor,
        scales: RawTensor,
    },
}

impl StoredTensor {
    pub fn shape(&self) -> &[usize] {
        match self {
            StoredTensor::Plain(t) => &t.shape,
            StoredTensor::Quantized { weight, .. } => &weight.shape,
        }
    }

    /// Stored bytes (payload only).
    pub fn nbytes(&self) -> usize {
        match self {
            StoredTensor::Plain(t) => t.data.len(),
            StoredTensor::Quantized { weight, scales } => weight.data.len() + scales.data.len(),
        }
    }
}

/// Anything that serves a checkpoint's tensors by their release name
/// (`transformer/decoder_layer_0/moe/linear/w`, ...).
pub trait TensorSource: Send + Sync {
    /// The directory or file the tensors come from, for error messages.
    fn origin(&self) -> &Path;
    /// Every tensor name present.
    fn names(&self) -> Vec<String>;
    /// The tensor, viewing mapped bytes.
    fn load(&self, name: &str) -> Result<StoredTensor>;
}

/// Checks every tensor of `source` against what `cfg` requires and reports every mismatch
/// at once (missing, unexpected, shape, dtype, scale groups).
pub fn validate(source: &dyn TensorSource, cfg: &ModelConfig) -> Result<()> {
    let expected = expected_tensors(cfg);
    let mut problems = Vec::new();
    let present = source.names();
    for name in &present {
        if !expected.iter().any(|e| &e.name == name) {
            problems.push(format!("unexpected tensor '{name}'"));
        }
    }
    for e in &expected {
        if !present.contains(&e.name) {
            problems.push(format!("missing tensor '{}'", e.name));
            continue;
        }
        match source.load(&e.name) {
            Ok(t) => problems.extend(e.check(&t)),
            Err(err) => problems.push(err.to_string()),
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(CheckpointError::Mismatch {
            origin: source.origin().to_path_buf(),
            problems,
        })
    }
}

/// An opened model directory of either format, with its config.
pub struct ModelDir {
    pub config: ModelConfig,
    pub source: Box<dyn TensorSource>,
}

/// Which format a model directory holds, and where its config comes from.
enum Layout {
    Native,
    /// The `ckpt-0` directory and the config found for it (`None`: the `grok-1` preset).
    Release(PathBuf, Option<PathBuf>),
}

fn layout(path: &Path) -> Result<Layout> {
    if !path.is_dir() {
        return Err(CheckpointError::Io {
            path: path.to_path_buf(),
            source: std::io::Error::new(std::io::ErrorKind::NotFound, "no such directory"),
        });
    }
    if path.join(native::CHECKSUMS_FILE).is_file() {
        return Ok(Layout::Native);
    }
    let (ckpt, config_dir) = if path.join("ckpt-0").is_dir() {
        (path.join("ckpt-0"), path.to_path_buf())
    } else if path.join(ckpt0::file_name(0)).is_file() {
        let parent = path.parent().map(Path::to_path_buf).unwrap_or_default();
        (path.to_path_buf(), parent)
    } else {
        return Err(CheckpointError::NotAModel {
            path: path.to_path_buf(),
        });
    };
    let config = [path.join("config.json"), config_dir.join("config.json")]
        .into_iter()
        .find(|p| p.is_file());
    Ok(Layout::Release(ckpt, config))
}

/// The config of the model at `path` (either format), without reading any weights.
pub fn model_config(path: &Path) -> Result<ModelConfig> {
    match layout(path)? {
        Layout::Native => Ok(ModelConfig::from_json_file(&path.join("config.json"))?),
        Layout::Release(_, Some(p)) => Ok(ModelConfig::from_json_file(&p)?),
        Layout::Release(ckpt, None) => {
            tracing::info!(
                "{}: no config.json beside it, using the grok-1 preset",
                ckpt.display()
            );
            Ok(ModelConfig::grok1())
        }
    }
}

/// Opens `path` as a native model or a release checkpoint and validates it against its config.
///
/// Accepted layouts: a native directory (`config.json`, `*.safetensors`, `checksums.json`); a
/// directory holding `ckpt-0/` (config from its `config.json`, else the `grok-1` preset); or a
/// `ckpt-0` directory itself (config from its parent's `config.json`, else `grok-1`).
pub fn open_model(path: &Path) -> Result<ModelDir> {
    let config = model_config(path)?;
    let source: Box<dyn TensorSource> = match layout(path)? {
        Layout::Native => Box::new(native::NativeSource::open(path)?),
        Layout::Release(ckpt, _) => Box::new(ckpt0::Ckpt0Source::open(&ckpt, &config)?),
    };
    validate(source.as_ref(), &config)?;
    Ok(ModelDir { config, source })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn narrow_rows_is_zero_copy_and_columns_copy() {
        let data: Vec<u8> = (0u8..24).collect();
        let t = RawTensor::new(DType::I8, vec![2, 3, 4], ByteView::from_vec(data)).unwrap();
        let e1 = t.narrow(0, 1, 1).unwrap();
        assert_eq!(e1.shape, vec![1, 3, 4]);
        assert_eq!(e1.data.as_slice()[0], 12);
        let cols = t.narrow(2, 1, 2).unwrap();
        assert_eq!(cols.shape, vec![2, 3, 2]);
        assert_eq!(
            cols.data.as_slice(),
            &[1, 2, 5, 6, 9, 10, 13, 14, 17, 18, 21, 22]
        );
        let rows = e1.narrow(1, 1, 2).unwrap();
        assert_eq!(rows.data.as_slice(), &[16, 17, 18, 19, 20, 21, 22, 23]);
        assert!(t.narrow(2, 3, 2).is_none());
        assert!(t.narrow(3, 0, 1).is_none());
    }

    #[test]
    fn raw_tensor_rejects_wrong_length() {
        assert!(RawTensor::new(DType::F32, vec![2], ByteView::from_vec(vec![0; 7])).is_err());
        assert!(
            RawTensor::new(DType::F32, vec![usize::MAX, 2], ByteView::from_vec(vec![])).is_err()
        );
    }
}
