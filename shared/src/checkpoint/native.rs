//! Our native format: a directory of `config.json`, one or more
//! `model-NNNNN-of-MMMMM.safetensors` shards and `checksums.json`.
//!
//! - Plain tensors are stored under their release name with their stored dtype (f32 in the
//!   release). A `QuantizedWeight8bit` `X` is stored as `X.weight` (I8) and `X.scales` (BF16),
//!   exactly as in the release (never dequantised).
//! - Shards are standard safetensors files (8-byte little-endian header length, JSON header
//!   padded with spaces to a multiple of 8, data offsets relative to the data section), so any
//!   safetensors reader can open them. Tensors appear in the order they were written.
//! - `checksums.json` lists every shard with its size and xxh3-128 digest (of the whole file).
//!   It is written last, after the shards and `config.json`, so its presence marks a complete
//!   model. `config.json` is not checksummed: shape fields are checked against the tensors by
//!   `validate` anyway.
//!
//! Loading maps each shard once and hands out zero-copy views of the mapping.

use super::{CheckpointError, DType, RawTensor, Result, StoredTensor, TensorSource};
use crate::bytes::ByteView;
use crate::config::ModelConfig;
use rayon::prelude::*;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use xxhash_rust::xxh3::Xxh3Default;

pub const CHECKSUMS_FILE: &str = "checksums.json";
pub const CONFIG_FILE: &str = "config.json";
/// `format` field of `checksums.json`.
pub const FORMAT_NAME: &str = "grok-native";
/// `format_version` field of `checksums.json`; bump on any incompatible change.
pub const FORMAT_VERSION: u32 = 1;
/// `hash` field of `checksums.json`.
pub const HASH_NAME: &str = "xxh3-128";
/// Suffixes of the two halves of a stored `QuantizedWeight8bit`.
pub const WEIGHT_SUFFIX: &str = ".weight";
pub const SCALES_SUFFIX: &str = ".scales";
const SHARD_EXT: &str = ".safetensors";
const PARTIAL_SUFFIX: &str = ".partial";
/// A manifest of a few hundred shards is a few tens of KiB; refuse absurd ones unread.
const MAX_CHECKSUMS_BYTES: u64 = 16 << 20;
/// Bytes hashed between progress reports.
const HASH_CHUNK: usize = 16 << 20;

/// Shard file name, 1-based like Hugging Face's: `model-00001-of-00003.safetensors`.
pub fn shard_file_name(index: usize, count: usize) -> String {
    format!("model-{:05}-of-{:05}{SHARD_EXT}", index + 1, count)
}

/// One shard's entry in `checksums.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct FileChecksum {
    pub size: u64,
    /// xxh3-128 of the whole file as 32 lowercase hex digits.
    pub xxh3_128: String,
}

/// The contents of `checksums.json`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Checksums {
    pub format: String,
    pub format_version: u32,
    pub hash: String,
    /// Shard file name (no directory) → size and digest.
    pub files: BTreeMap<String, FileChecksum>,
}

impl Checksums {
    /// Reads and checks `dir/checksums.json` (format, version, file names).
    pub fn read(dir: &Path) -> Result<Self> {
        let path = dir.join(CHECKSUMS_FILE);
        let io = |source| CheckpointError::Io {
            path: path.clone(),
            source,
        };
        let bad = |msg: String| CheckpointError::Format {
            file: path.clone(),
            msg,
        };
        let len = std::fs::metadata(&path).map_err(io)?.len();
        if len > MAX_CHECKSUMS_BYTES {
            return Err(bad(format!(
                "{len} bytes is too large for a checksum manifest"
            )));
        }
        let text = std::fs::read_to_string(&path).map_err(io)?;
        let c: Checksums =
            serde_json::from_str(&text).map_err(|e| bad(format!("not a valid manifest: {e}")))?;
        if c.format != FORMAT_NAME {
            return Err(bad(format!(
                "format '{}', expected '{FORMAT_NAME}'",
                c.format
            )));
        }
        if c.format_version != FORMAT_VERSION {
            return Err(bad(format!(
                "format_version {} is not supported (this build reads version {FORMAT_VERSION})",
                c.format_version
            )));
        }
        if c.hash != HASH_NAME {
            return Err(bad(format!("hash '{}', expected '{HASH_NAME}'", c.hash)));
        }
        if c.files.is_empty() {
            return Err(bad("lists no files".into()));
        }
        for name in c.files.keys() {
            // Names are plain file names in `dir`: never let the manifest point elsewhere.
            let plain = !name.is_empty()
                && !name.starts_with('.')
                && !name.contains(['/', '\\'])
                && name.ends_with(SHARD_EXT);
            if !plain {
                return Err(bad(format!(
                    "'{name}' is not a shard file name (expected NAME{SHARD_EXT} inside the directory)"
                )));
            }
        }
        Ok(c)
    }
}

/// Digest as written in `checksums.json`.
fn hex128(d: u128) -> String {
    format!("{d:032x}")
}

/// A native model directory's tensors, viewing memory-mapped shards.
pub struct NativeSource {
    dir: PathBuf,
    files: Vec<PathBuf>,
    /// Logical names (quantized pairs folded into one) in file order.
    names: Vec<String>,
    tensors: HashMap<String, StoredTensor>,
}

impl std::fmt::Debug for NativeSource {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeSource")
            .field("dir", &self.dir)
            .field("files", &self.files.len())
            .field("tensors", &self.names.len())
            .finish()
    }
}

impl NativeSource {
    /// Opens `dir`, verifying every shard's size and xxh3-128 digest against
    /// `checksums.json` (reads every byte once; shards are hashed in parallel).
    pub fn open(dir: &Path) -> Result<Self> {
        Self::open_with_progress(dir, &|_, _| {})
    }

    /// [`NativeSource::open`] reporting `(bytes hashed, bytes total)` while verifying.
    /// The callback may be called from several threads at once.
    pub fn open_with_progress(dir: &Path, progress: &(dyn Fn(u64, u64) + Sync)) -> Result<Self> {
        let sums = Checksums::read(dir)?;
        let mapped = map_listed(dir, &sums)?;
        let total: u64 = sums.files.values().map(|f| f.size).sum();
        let done = AtomicU64::new(0);
        mapped.par_iter().try_for_each(|(path, view, want)| {
            let mut h = Xxh3Default::new();
            for chunk in view.as_slice().chunks(HASH_CHUNK) {
                h.update(chunk);
                let d = done.fetch_add(chunk.len() as u64, Ordering::Relaxed) + chunk.len() as u64;
                progress(d, total);
            }
            let actual = hex128(h.digest128());
            if actual != want.xxh3_128.to_ascii_lowercase() {
                return Err(CheckpointError::Checksum {
                    file: path.clone(),
                    expected: want.xxh3_128.clone(),
                    actual,
                });
            }
            Ok(())
        })?;
        Self::from_mapped(dir, mapped)
    }

    /// Opens `dir` without hashing the shards: for callers that verified them already (e.g. a
    /// worker reopening a directory the coordinator checked, or right after writing it). Still
    /// checks that exactly the files `checksums.json` lists are present with the listed sizes,
    /// and parses every header strictly.
    pub fn open_unverified(dir: &Path) -> Result<Self> {
        let sums = Checksums::read(dir)?;
        let mapped = map_listed(dir, &sums)?;
        Self::from_mapped(dir, mapped)
    }

    /// The shard files, in order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }

    fn from_mapped(dir: &Path, mapped: Vec<(PathBuf, ByteView, FileChecksum)>) -> Result<Self> {
        let mut stored: HashMap<String, (usize, RawTensor)> = HashMap::new();
        let mut order: Vec<String> = Vec::new();
        let mut files = Vec::with_capacity(mapped.len());
        for (fi, (path, view, _)) in mapped.into_iter().enumerate() {
            for (name, t) in parse_shard(&path, &view)? {
                if let Some((other, _)) = stored.get(&name) {
                    let other = files.get(*other).unwrap_or(&path);
                    return Err(CheckpointError::Format {
                        file: path.clone(),
                        msg: format!(
                            "tensor '{name}' is also stored in {}",
                            Path::new(other).display()
                        ),
                    });
                }
                order.push(name.clone());
                stored.insert(name, (fi, t));
            }
            files.push(path);
        }
        let mut names = Vec::new();
        let mut tensors = HashMap::new();
        for name in &order {
            let file_of = |n: &str| {
                stored
                    .get(n)
                    .and_then(|(fi, _)| files.get(*fi))
                    .cloned()
                    .unwrap_or_else(|| dir.to_path_buf())
            };
            let bad = |n: &str, msg: String| CheckpointError::Format {
                file: file_of(n),
                msg,
            };
            if let Some(base) = name.strip_suffix(SCALES_SUFFIX) {
                // Handled with its `.weight` half; a lone `.scales` is an error.
                if !stored.contains_key(&format!("{base}{WEIGHT_SUFFIX}")) {
                    return Err(bad(
                        name,
                        format!("'{name}' has no matching '{base}{WEIGHT_SUFFIX}'"),
                    ));
                }
                continue;
            }
            let (logical, t) = if let Some(base) = name.strip_suffix(WEIGHT_SUFFIX) {
                let sname = format!("{base}{SCALES_SUFFIX}");
                let (Some((_, weight)), Some((_, scales))) = (stored.get(name), stored.get(&sname))
                else {
                    return Err(bad(name, format!("'{name}' has no matching '{sname}'")));
                };
                let t = StoredTensor::Quantized {
                    weight: weight.clone(),
                    scales: scales.clone(),
                };
                (base.to_string(), t)
            } else {
                let Some((_, t)) = stored.get(name) else {
                    continue;
                };
                (name.clone(), StoredTensor::Plain(t.clone()))
            };
            if tensors.contains_key(&logical) {
                return Err(bad(
                    name,
                    format!("'{logical}' is stored both plain and as a quantized pair"),
                ));
            }
            names.push(logical.clone());
            tensors.insert(logical, t);
        }
        Ok(NativeSource {
            dir: dir.to_path_buf(),
            files,
            names,
            tensors,
        })
    }
}

impl TensorSource for NativeSource {
    fn origin(&self) -> &Path {
        &self.dir
    }
    fn names(&self) -> Vec<String> {
        self.names.clone()
    }
    fn load(&self, name: &str) -> Result<StoredTensor> {
        self.tensors
            .get(name)
            .cloned()
            .ok_or_else(|| CheckpointError::MissingTensor {
                origin: self.dir.clone(),
                name: name.to_string(),
            })
    }
}

/// Checks the directory holds exactly the listed shards with their listed sizes, and maps them.
fn map_listed(dir: &Path, sums: &Checksums) -> Result<Vec<(PathBuf, ByteView, FileChecksum)>> {
    let listed: HashSet<&str> = sums.files.keys().map(String::as_str).collect();
    let entries = std::fs::read_dir(dir).map_err(|source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    })?;
    for entry in entries {
        let entry = entry.map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let name = entry.file_name().to_string_lossy().into_owned();
        if name.ends_with(SHARD_EXT) && !listed.contains(name.as_str()) {
            return Err(CheckpointError::Format {
                file: entry.path(),
                msg: format!(
                    "shard is not listed in {CHECKSUMS_FILE}: it does not belong to this model \
                     (remove it, or reconvert)"
                ),
            });
        }
    }
    let mut out = Vec::with_capacity(sums.files.len());
    for (name, sum) in &sums.files {
        let path = dir.join(name);
        let io = |source| CheckpointError::Io {
            path: path.clone(),
            source,
        };
        let file = File::open(&path).map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        if len != sum.size {
            return Err(CheckpointError::Format {
                file: path.clone(),
                msg: format!(
                    "{len} bytes, but {CHECKSUMS_FILE} lists {} bytes: the file is truncated or \
                     was modified after conversion",
                    sum.size
                ),
            });
        }
        // SAFETY: the mapping is read-only; the model files are not modified while in use (a
        // file truncated under us would fault, as with any mmap-based loader).
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        out.push((path, ByteView::from_mmap(map), sum.clone()));
    }
    Ok(out)
}

fn dtype_from_st(d: safetensors::Dtype) -> Option<DType> {
    use safetensors::Dtype as S;
    Some(match d {
        S::F32 => DType::F32,
        S::BF16 => DType::BF16,
        S::F16 => DType::F16,
        S::I8 => DType::I8,
        S::U8 => DType::U8,
        S::I32 => DType::I32,
        _ => return None,
    })
}

fn dtype_st_name(d: DType) -> &'static str {
    match d {
        DType::F32 => "F32",
        DType::BF16 => "BF16",
        DType::F16 => "F16",
        DType::I8 => "I8",
        DType::U8 => "U8",
        DType::I32 => "I32",
    }
}

/// Parses one shard's header and returns its tensors (in offset order) viewing `view`.
/// The safetensors crate bounds the header (100 MB), rejects malformed JSON, unknown dtypes,
/// overflowing shapes, gaps/overlaps between tensors, sizes that disagree with shapes and a
/// data section whose length differs from the file's.
fn parse_shard(path: &Path, view: &ByteView) -> Result<Vec<(String, RawTensor)>> {
    let bad = |msg: String| CheckpointError::Format {
        file: path.to_path_buf(),
        msg,
    };
    let (n, meta) = safetensors::SafeTensors::read_metadata(view.as_slice())
        .map_err(|e| bad(format!("invalid safetensors header: {e}")))?;
    let data_start = n
        .checked_add(8)
        .ok_or_else(|| bad("header length overflows".into()))?;
    let infos = meta.tensors();
    let mut out = Vec::with_capacity(infos.len());
    for name in meta.offset_keys() {
        let Some(info) = infos.get(&name) else {
            return Err(bad(format!("tensor '{name}' vanished from the header")));
        };
        let dtype = dtype_from_st(info.dtype).ok_or_else(|| {
            bad(format!(
                "tensor '{name}': dtype {} is not supported",
                info.dtype
            ))
        })?;
        let (s, e) = info.data_offsets;
        let range = data_start
            .checked_add(s)
            .zip(data_start.checked_add(e))
            .map(|(a, b)| a..b)
            .ok_or_else(|| bad(format!("tensor '{name}': offsets overflow")))?;
        let data = view.slice(range).ok_or_else(|| {
            bad(format!(
                "tensor '{name}': data offsets [{s}, {e}) out of bounds"
            ))
        })?;
        let t = RawTensor::new(dtype, info.shape.clone(), data)
            .map_err(|m| bad(format!("tensor '{name}': {m}")))?;
        out.push((name, t));
    }
    Ok(out)
}

/// One array to write: stored name, element type, shape.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TensorSpec {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
}

impl TensorSpec {
    pub fn new(name: impl Into<String>, dtype: DType, shape: Vec<usize>) -> Self {
        TensorSpec {
            name: name.into(),
            dtype,
            shape,
        }
    }

    /// Payload bytes; `None` if the shape overflows.
    pub fn nbytes(&self) -> Option<u64> {
        self.shape
            .iter()
            .try_fold(self.dtype.size() as u64, |a, &d| a.checked_mul(d as u64))
    }
}

/// A shard that [`NativeWriter::finish`] wrote.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WrittenFile {
    pub name: String,
    pub checksum: FileChecksum,
}

struct ShardPlan {
    file_name: String,
    /// Length prefix + padded JSON.
    header: Vec<u8>,
    data_len: u64,
}

struct OpenShard {
    out: BufWriter<File>,
    hasher: Xxh3Default,
    size: u64,
}

/// Writes a native model directory as a stream of bytes: the tensor list is fixed up front
/// (so headers are known before any data), then payload bytes are appended in order through
/// [`NativeWriter::write_chunk`], in chunks of any size (a chunk may span tensors and shards).
/// Memory use is one small write buffer. Shards are written as `NAME.partial` and renamed by
/// [`NativeWriter::finish`], which then writes `config.json` and finally `checksums.json`.
/// Dropping an unfinished writer removes its `.partial` files.
pub struct NativeWriter {
    dir: PathBuf,
    config_json: String,
    shards: Vec<ShardPlan>,
    cur: usize,
    shard_written: u64,
    open: Option<OpenShard>,
    done: Vec<WrittenFile>,
    written: u64,
    total: u64,
    partials: Vec<PathBuf>,
    finished: bool,
}

impl std::fmt::Debug for NativeWriter {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NativeWriter")
            .field("dir", &self.dir)
            .field("shards", &self.shards.len())
            .field("written", &self.written)
            .field("total", &self.total)
            .finish()
    }
}

impl NativeWriter {
    /// Shards hold at most this many payload bytes (a larger single tensor gets its own shard).
    pub const DEFAULT_MAX_SHARD_BYTES: u64 = 4 << 30;
    const BUF_BYTES: usize = 1 << 20;

    /// Starts writing `specs` (in this order) into `dir`, which is created if needed and must
    /// be empty if it exists.
    pub fn create(dir: &Path, config: &ModelConfig, specs: &[TensorSpec]) -> Result<Self> {
        Self::with_max_shard_bytes(dir, config, specs, Self::DEFAULT_MAX_SHARD_BYTES)
    }

    pub fn with_max_shard_bytes(
        dir: &Path,
        config: &ModelConfig,
        specs: &[TensorSpec],
        max_shard_bytes: u64,
    ) -> Result<Self> {
        let bad = |msg: String| CheckpointError::Format {
            file: dir.to_path_buf(),
            msg,
        };
        let mut seen = HashSet::new();
        let mut sizes = Vec::with_capacity(specs.len());
        for s in specs {
            if s.name.is_empty() || s.name == "__metadata__" || !seen.insert(s.name.as_str()) {
                return Err(bad(format!(
                    "invalid or duplicate tensor name '{}'",
                    s.name
                )));
            }
            sizes.push(s.nbytes().ok_or_else(|| {
                bad(format!(
                    "tensor '{}': shape {:?} overflows",
                    s.name, s.shape
                ))
            })?);
        }
        let total = sizes
            .iter()
            .try_fold(0u64, |a, &b| a.checked_add(b))
            .ok_or_else(|| bad("total size overflows".into()))?;
        check_output_dir(dir)?;
        std::fs::create_dir_all(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;

        // Greedy packing in the given order: a shard closes when the next tensor would push
        // it past the limit.
        let mut groups: Vec<Vec<usize>> = vec![Vec::new()];
        let mut cur_bytes = 0u64;
        for (i, &nb) in sizes.iter().enumerate() {
            let last_nonempty = groups.last().is_some_and(|g| !g.is_empty());
            if last_nonempty && cur_bytes.saturating_add(nb) > max_shard_bytes {
                groups.push(Vec::new());
                cur_bytes = 0;
            }
            if let Some(g) = groups.last_mut() {
                g.push(i);
            }
            cur_bytes += nb;
        }
        let count = groups.len();
        let mut shards = Vec::with_capacity(count);
        for (si, g) in groups.iter().enumerate() {
            let mut json = format!(
                "{{\"__metadata__\":{{\"format\":\"{FORMAT_NAME}\",\"format_version\":\"{FORMAT_VERSION}\"}}"
            );
            let mut off = 0u64;
            for &i in g {
                let (s, nb) = (&specs[i], sizes[i]);
                let shape: Vec<String> = s.shape.iter().map(|d| d.to_string()).collect();
                json.push_str(&format!(
                    ",{}:{{\"dtype\":\"{}\",\"shape\":[{}],\"data_offsets\":[{},{}]}}",
                    serde_json::Value::String(s.name.clone()),
                    dtype_st_name(s.dtype),
                    shape.join(","),
                    off,
                    off + nb
                ));
                off += nb;
            }
            json.push('}');
            // The spec pads the header with spaces so the data section starts 8-aligned.
            while json.len() % 8 != 0 {
                json.push(' ');
            }
            let mut header = Vec::with_capacity(8 + json.len());
            header.extend_from_slice(&(json.len() as u64).to_le_bytes());
            header.extend_from_slice(json.as_bytes());
            shards.push(ShardPlan {
                file_name: shard_file_name(si, count),
                header,
                data_len: off,
            });
        }
        let mut w = NativeWriter {
            dir: dir.to_path_buf(),
            config_json: config.to_json(),
            shards,
            cur: 0,
            shard_written: 0,
            open: None,
            done: Vec::new(),
            written: 0,
            total,
            partials: Vec::new(),
            finished: false,
        };
        w.settle()?;
        Ok(w)
    }

    /// Payload bytes declared (all tensors).
    pub fn total_bytes(&self) -> u64 {
        self.total
    }

    /// Payload bytes accepted so far.
    pub fn bytes_written(&self) -> u64 {
        self.written
    }

    /// Number of shard files this writer produces.
    pub fn shard_count(&self) -> usize {
        self.shards.len()
    }

    /// Appends payload bytes (the next bytes of the current tensor, continuing into the next
    /// tensors in order).
    pub fn write_chunk(&mut self, mut bytes: &[u8]) -> Result<()> {
        if bytes.len() as u64 > self.total - self.written {
            return Err(CheckpointError::Format {
                file: self.dir.clone(),
                msg: format!(
                    "writer got {} bytes more than the {} declared",
                    bytes.len() as u64 - (self.total - self.written),
                    self.total
                ),
            });
        }
        while !bytes.is_empty() {
            self.settle()?;
            let room = match self.shards.get(self.cur) {
                Some(s) => s.data_len - self.shard_written,
                None => 0,
            };
            let n = (room.min(bytes.len() as u64)) as usize;
            let (Some(o), true) = (self.open.as_mut(), n > 0) else {
                // Unreachable given the size check above; an error beats a silent loop.
                return Err(CheckpointError::Format {
                    file: self.dir.clone(),
                    msg: "writer state out of sync".into(),
                });
            };
            let (head, rest) = bytes.split_at(n);
            o.out
                .write_all(head)
                .map_err(|source| CheckpointError::Io {
                    path: self.partials.last().cloned().unwrap_or_default(),
                    source,
                })?;
            o.hasher.update(head);
            o.size += n as u64;
            self.shard_written += n as u64;
            self.written += n as u64;
            bytes = rest;
        }
        self.settle()
    }

    /// Opens the current shard if needed and closes every shard whose data is complete
    /// (including empty ones).
    fn settle(&mut self) -> Result<()> {
        while let Some(plan) = self.shards.get(self.cur) {
            if self.open.is_none() {
                let path = self.dir.join(format!("{}{PARTIAL_SUFFIX}", plan.file_name));
                let io = |source| CheckpointError::Io {
                    path: path.clone(),
                    source,
                };
                let file = File::create(&path).map_err(io)?;
                self.partials.push(path.clone());
                let mut out = BufWriter::with_capacity(Self::BUF_BYTES, file);
                out.write_all(&plan.header).map_err(io)?;
                let mut hasher = Xxh3Default::new();
                hasher.update(&plan.header);
                self.open = Some(OpenShard {
                    out,
                    hasher,
                    size: plan.header.len() as u64,
                });
            }
            if self.shard_written < plan.data_len {
                return Ok(());
            }
            if let Some(o) = self.open.take() {
                let path = self.partials.last().cloned().unwrap_or_default();
                let io = |source| CheckpointError::Io {
                    path: path.clone(),
                    source,
                };
                let file = o.out.into_inner().map_err(|e| io(e.into_error()))?;
                file.sync_all().map_err(io)?;
                self.done.push(WrittenFile {
                    name: plan.file_name.clone(),
                    checksum: FileChecksum {
                        size: o.size,
                        xxh3_128: hex128(o.hasher.digest128()),
                    },
                });
            }
            self.cur += 1;
            self.shard_written = 0;
        }
        Ok(())
    }

    /// Checks every declared byte arrived, renames the shards into place, then writes
    /// `config.json` and, last, `checksums.json`.
    pub fn finish(mut self) -> Result<Vec<WrittenFile>> {
        self.settle()?;
        if self.written != self.total || self.cur != self.shards.len() {
            return Err(CheckpointError::Format {
                file: self.dir.clone(),
                msg: format!(
                    "writer finished after {} of {} declared bytes",
                    self.written, self.total
                ),
            });
        }
        for (p, f) in self.partials.iter().zip(&self.done) {
            let to = self.dir.join(&f.name);
            std::fs::rename(p, &to).map_err(|source| CheckpointError::Io { path: to, source })?;
        }
        self.partials.clear();
        write_file_atomic(&self.dir.join(CONFIG_FILE), self.config_json.as_bytes())?;
        let sums = Checksums {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            hash: HASH_NAME.into(),
            files: self
                .done
                .iter()
                .map(|f| (f.name.clone(), f.checksum.clone()))
                .collect(),
        };
        let text = serde_json::to_string_pretty(&sums).map_err(|e| CheckpointError::Format {
            file: self.dir.join(CHECKSUMS_FILE),
            msg: e.to_string(),
        })?;
        write_file_atomic(&self.dir.join(CHECKSUMS_FILE), text.as_bytes())?;
        // Persist the renames; not every platform can open a directory, so best effort.
        if let Ok(d) = File::open(&self.dir) {
            let _ = d.sync_all();
        }
        self.finished = true;
        Ok(std::mem::take(&mut self.done))
    }
}

impl Drop for NativeWriter {
    fn drop(&mut self) {
        if !self.finished {
            self.open = None;
            for p in &self.partials {
                let _ = std::fs::remove_file(p);
            }
        }
    }
}

/// Refuses an output directory that exists and is not empty (or is not a directory), so a
/// model is never written over another. Creates nothing.
pub fn check_output_dir(dir: &Path) -> Result<()> {
    let io = |source| CheckpointError::Io {
        path: dir.to_path_buf(),
        source,
    };
    if !dir.exists() {
        return Ok(());
    }
    let mut it = std::fs::read_dir(dir).map_err(io)?;
    if it.next().is_some() {
        return Err(io(std::io::Error::new(
            std::io::ErrorKind::AlreadyExists,
            "output directory is not empty; refusing to write a model into it \
             (choose a new directory or empty this one)",
        )));
    }
    Ok(())
}

/// Writes `path` via `path.partial` + fsync + rename, so readers never see half a file.
fn write_file_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(PARTIAL_SUFFIX);
    let tmp = PathBuf::from(tmp);
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = File::create(&tmp).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)?;
    drop(f);
    std::fs::rename(&tmp, path).map_err(io)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::layout::TensorKind;

    fn cfg() -> ModelConfig {
        ModelConfig::tiny()
    }

    fn pattern(n: usize, seed: u8) -> Vec<u8> {
        (0..n)
            .map(|i| (i as u8).wrapping_mul(31).wrapping_add(seed))
            .collect()
    }

    /// Writes `specs` with deterministic payloads fed in awkward chunk sizes; returns payloads.
    fn write_dir(dir: &Path, specs: &[TensorSpec], max_shard: u64) -> Vec<Vec<u8>> {
        let mut w = NativeWriter::with_max_shard_bytes(dir, &cfg(), specs, max_shard).unwrap();
        let payloads: Vec<Vec<u8>> = specs
            .iter()
            .enumerate()
            .map(|(i, s)| pattern(s.nbytes().unwrap() as usize, i as u8))
            .collect();
        let all: Vec<u8> = payloads.concat();
        for c in all.chunks(7) {
            w.write_chunk(c).unwrap();
        }
        w.finish().unwrap();
        payloads
    }

    fn sample_specs() -> Vec<TensorSpec> {
        vec![
            TensorSpec::new("a/plain", DType::F32, vec![3, 5]),
            TensorSpec::new("b/q.weight", DType::I8, vec![2, 8, 6]),
            TensorSpec::new("b/q.scales", DType::BF16, vec![2, 1, 6]),
            TensorSpec::new("c/empty", DType::F32, vec![0, 4]),
            TensorSpec::new("d/bf", DType::BF16, vec![7]),
        ]
    }

    #[test]
    fn write_open_round_trip_zero_copy() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let specs = sample_specs();
        // 100-byte shards force several files.
        let payloads = write_dir(&dir, &specs, 100);
        let src = NativeSource::open(&dir).unwrap();
        assert!(src.files().len() >= 2, "{:?}", src.files());
        assert_eq!(src.names(), vec!["a/plain", "b/q", "c/empty", "d/bf"]);
        let StoredTensor::Plain(a) = src.load("a/plain").unwrap() else {
            panic!()
        };
        assert_eq!((a.dtype, a.shape.clone()), (DType::F32, vec![3, 5]));
        assert_eq!(a.data.as_slice(), &payloads[0][..]);
        let StoredTensor::Quantized { weight, scales } = src.load("b/q").unwrap() else {
            panic!()
        };
        assert_eq!(
            (weight.dtype, weight.shape.clone()),
            (DType::I8, vec![2, 8, 6])
        );
        assert_eq!(weight.data.as_slice(), &payloads[1][..]);
        assert_eq!(
            (scales.dtype, scales.shape.clone()),
            (DType::BF16, vec![2, 1, 6])
        );
        assert_eq!(scales.data.as_slice(), &payloads[2][..]);
        let StoredTensor::Plain(d) = src.load("d/bf").unwrap() else {
            panic!()
        };
        assert_eq!(d.data.as_slice(), &payloads[4][..]);
        // Zero-copy: two loads view the same mapped bytes.
        let StoredTensor::Plain(a2) = src.load("a/plain").unwrap() else {
            panic!()
        };
        assert_eq!(a.data.as_slice().as_ptr(), a2.data.as_slice().as_ptr());
        assert!(matches!(
            src.load("nope"),
            Err(CheckpointError::MissingTensor { .. })
        ));
        // No leftovers; exactly the listed files plus config and checksums.
        let mut listing: Vec<String> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        listing.sort();
        assert!(
            listing.iter().all(|n| !n.ends_with(PARTIAL_SUFFIX)),
            "{listing:?}"
        );
        assert!(listing.contains(&CONFIG_FILE.to_string()));
        assert_eq!(
            ModelConfig::from_json_file(&dir.join(CONFIG_FILE)).unwrap(),
            cfg()
        );
        // Header follows the spec: 8-aligned data section, standard dtype names.
        let f = std::fs::read(&src.files()[0]).unwrap();
        let n = u64::from_le_bytes(f[..8].try_into().unwrap()) as usize;
        assert_eq!(n % 8, 0);
        let h: serde_json::Value = serde_json::from_slice(&f[8..8 + n]).unwrap();
        assert_eq!(h["a/plain"]["dtype"], "F32");
        assert_eq!(h["a/plain"]["data_offsets"], serde_json::json!([0, 60]));
    }

    #[test]
    fn one_shard_by_default_and_unverified_open() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        write_dir(&dir, &sample_specs(), NativeWriter::DEFAULT_MAX_SHARD_BYTES);
        let src = NativeSource::open_unverified(&dir).unwrap();
        assert_eq!(src.files().len(), 1);
        assert!(src.files()[0].ends_with("model-00001-of-00001.safetensors"));
    }

    /// The corrupt-file tests: the error names the file.
    fn corrupt_setup() -> (tempfile::TempDir, PathBuf, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        write_dir(&dir, &sample_specs(), 100);
        let shard = NativeSource::open(&dir).unwrap().files()[1].clone();
        (tmp, dir, shard)
    }

    #[test]
    fn corrupted_byte_gives_checksum_error_naming_file() {
        let (_t, dir, shard) = corrupt_setup();
        let mut b = std::fs::read(&shard).unwrap();
        let last = b.len() - 1;
        b[last] ^= 1;
        std::fs::write(&shard, b).unwrap();
        match NativeSource::open(&dir) {
            Err(CheckpointError::Checksum { file, .. }) => assert_eq!(file, shard),
            other => panic!("{other:?}"),
        }
        // Unverified open does not hash, so it accepts it.
        NativeSource::open_unverified(&dir).unwrap();
    }

    #[test]
    fn truncated_file_is_an_error_naming_it() {
        let (_t, dir, shard) = corrupt_setup();
        let b = std::fs::read(&shard).unwrap();
        std::fs::write(&shard, &b[..b.len() - 3]).unwrap();
        for r in [
            NativeSource::open(&dir),
            NativeSource::open_unverified(&dir),
        ] {
            let e = r.unwrap_err();
            assert!(
                matches!(&e, CheckpointError::Format { file, .. } if file == &shard),
                "{e}"
            );
            assert!(e.to_string().contains("truncated"), "{e}");
        }
    }

    #[test]
    fn missing_and_unlisted_files() {
        let (_t, dir, shard) = corrupt_setup();
        let moved = dir.join("stray.safetensors");
        std::fs::rename(&shard, &moved).unwrap();
        // The stray (unlisted) shard is reported first...
        match NativeSource::open(&dir) {
            Err(CheckpointError::Format { file, msg }) => {
                assert_eq!(file, moved);
                assert!(msg.contains("not listed"), "{msg}");
            }
            other => panic!("{other:?}"),
        }
        // ...and once it is gone, the missing one.
        std::fs::remove_file(&moved).unwrap();
        match NativeSource::open(&dir) {
            Err(CheckpointError::Io { path, .. }) => assert_eq!(path, shard),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn bad_manifests_are_rejected() {
        let (_t, dir, _) = corrupt_setup();
        let p = dir.join(CHECKSUMS_FILE);
        let good = std::fs::read_to_string(&p).unwrap();
        for bad in [
            "not json".to_string(),
            good.replace("\"format_version\": 1", "\"format_version\": 99"),
            good.replace("model-00001", "../model-00001"),
        ] {
            std::fs::write(&p, &bad).unwrap();
            let e = NativeSource::open(&dir).unwrap_err();
            assert!(
                matches!(&e, CheckpointError::Format { file, .. } if file == &p),
                "{e}"
            );
        }
    }

    /// Writes a single-shard directory holding `file` as its shard, with a matching manifest,
    /// so that `open` gets past the checksum and must judge the header itself.
    fn open_hostile(file: &[u8]) -> Result<NativeSource> {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path();
        let name = shard_file_name(0, 1);
        std::fs::write(dir.join(&name), file).unwrap();
        let sums = Checksums {
            format: FORMAT_NAME.into(),
            format_version: FORMAT_VERSION,
            hash: HASH_NAME.into(),
            files: [(
                name,
                FileChecksum {
                    size: file.len() as u64,
                    xxh3_128: hex128(xxhash_rust::xxh3::xxh3_128(file)),
                },
            )]
            .into_iter()
            .collect(),
        };
        std::fs::write(
            dir.join(CHECKSUMS_FILE),
            serde_json::to_string(&sums).unwrap(),
        )
        .unwrap();
        NativeSource::open(dir)
    }

    fn st_file(header: &str, data_len: usize) -> Vec<u8> {
        let mut f = (header.len() as u64).to_le_bytes().to_vec();
        f.extend_from_slice(header.as_bytes());
        f.extend(std::iter::repeat_n(0u8, data_len));
        f
    }

    #[test]
    fn hostile_headers_are_format_errors() {
        let ok = r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#;
        assert!(open_hostile(&st_file(ok, 8)).is_ok());
        let mut huge = u64::MAX.to_le_bytes().to_vec();
        huge.extend_from_slice(b"{}");
        let mut big = 100u64.to_le_bytes().to_vec();
        big.extend_from_slice(b"{}");
        let mut not_utf8 = 8u64.to_le_bytes().to_vec();
        not_utf8.extend_from_slice(&[0xff; 8]);
        let cases: Vec<(&str, Vec<u8>)> = vec![
            ("huge length", huge),
            ("length past end", big),
            ("too short", vec![1, 2, 3]),
            ("bad json", st_file("{\"a\":", 0)),
            ("not utf8", not_utf8),
            (
                "offsets out of bounds",
                st_file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]}}"#,
                    4,
                ),
            ),
            (
                "overlap",
                st_file(
                    r#"{"a":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},"b":{"dtype":"F32","shape":[2],"data_offsets":[4,12]}}"#,
                    12,
                ),
            ),
            (
                "gap",
                st_file(
                    r#"{"a":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}"#,
                    8,
                ),
            ),
            (
                "size vs shape",
                st_file(
                    r#"{"a":{"dtype":"F32","shape":[3],"data_offsets":[0,8]}}"#,
                    8,
                ),
            ),
            (
                "overflowing shape",
                st_file(
                    r#"{"a":{"dtype":"F32","shape":[4611686018427387904,8],"data_offsets":[0,8]}}"#,
                    8,
                ),
            ),
            (
                "unsupported dtype",
                st_file(
                    r#"{"a":{"dtype":"F64","shape":[1],"data_offsets":[0,8]}}"#,
                    8,
                ),
            ),
            (
                "unknown dtype",
                st_file(
                    r#"{"a":{"dtype":"Q4","shape":[1],"data_offsets":[0,8]}}"#,
                    8,
                ),
            ),
            (
                "lone weight half",
                st_file(
                    r#"{"a.weight":{"dtype":"I8","shape":[8],"data_offsets":[0,8]}}"#,
                    8,
                ),
            ),
            (
                "plain and quantized",
                st_file(
                    r#"{"a":{"dtype":"I8","shape":[2],"data_offsets":[0,2]},"a.weight":{"dtype":"I8","shape":[2],"data_offsets":[2,4]},"a.scales":{"dtype":"I8","shape":[2],"data_offsets":[4,6]}}"#,
                    6,
                ),
            ),
        ];
        for (what, bytes) in cases {
            match open_hostile(&bytes) {
                Err(CheckpointError::Format { file, msg }) => {
                    assert!(
                        file.ends_with(shard_file_name(0, 1)),
                        "{what}: {file:?} {msg}"
                    )
                }
                Err(e) => panic!("{what}: wrong error {e}"),
                Ok(_) => panic!("{what}: accepted"),
            }
        }
    }

    #[test]
    fn writer_checks_its_input_and_cleans_up() {
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let specs = vec![TensorSpec::new("x", DType::F32, vec![4])];
        let mut w = NativeWriter::create(&dir, &cfg(), &specs).unwrap();
        assert!(w.write_chunk(&[0; 17]).is_err());
        w.write_chunk(&[0; 8]).unwrap();
        assert!(w.finish().is_err());
        // The failed writer removed its partial file, leaving the directory empty and reusable.
        assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 0);
        let dup = vec![specs[0].clone(), specs[0].clone()];
        assert!(NativeWriter::create(&dir, &cfg(), &dup).is_err());
        let w = NativeWriter::create(&dir, &cfg(), &specs).unwrap();
        drop(w);
        std::fs::write(dir.join("x"), b"1").unwrap();
        let e = NativeWriter::create(&dir, &cfg(), &specs).unwrap_err();
        assert!(e.to_string().contains("not empty"), "{e}");
    }

    #[test]
    fn layout_names_fold_into_quantized_pairs() {
        // The stored names convert/init produce for the real layout parse back to the
        // release names, quantized where the layout says so.
        let tmp = tempfile::tempdir().unwrap();
        let dir = tmp.path().join("m");
        let mut c = cfg();
        c.num_hidden_layers = 1;
        c.vocab_size = 64;
        let exp = crate::checkpoint::expected_tensors(&c);
        let mut specs = Vec::new();
        for e in &exp {
            match e.kind {
                TensorKind::Plain => {
                    specs.push(TensorSpec::new(&e.name, DType::F32, e.shape.clone()))
                }
                TensorKind::Quantized { .. } => {
                    specs.push(TensorSpec::new(
                        format!("{}.weight", e.name),
                        DType::I8,
                        e.shape.clone(),
                    ));
                    specs.push(TensorSpec::new(
                        format!("{}.scales", e.name),
                        DType::BF16,
                        e.scales_shape().unwrap(),
                    ));
                }
            }
        }
        let mut w = NativeWriter::create(&dir, &c, &specs).unwrap();
        let total = w.total_bytes() as usize;
        w.write_chunk(&vec![0u8; total]).unwrap();
        w.finish().unwrap();
        let src = NativeSource::open(&dir).unwrap();
        let names: Vec<String> = exp.iter().map(|e| e.name.clone()).collect();
        assert_eq!(src.names(), names);
        crate::checkpoint::validate(&src, &c).unwrap();
    }
}
