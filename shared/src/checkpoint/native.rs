//! Our native format: safetensors files + config.json + a checksum manifest.

use super::{Result, StoredTensor, TensorSource};
use std::path::{Path, PathBuf};

pub const CHECKSUMS_FILE: &str = "checksums.json";

pub struct NativeSource {
    dir: PathBuf,
}

impl NativeSource {
    pub fn open(dir: &Path) -> Result<Self> {
        Ok(NativeSource { dir: dir.to_path_buf() })
    }
}

impl TensorSource for NativeSource {
    fn origin(&self) -> &Path {
        &self.dir
    }
    fn names(&self) -> Vec<String> {
        todo!()
    }
    fn load(&self, _name: &str) -> Result<StoredTensor> {
        todo!()
    }
}
