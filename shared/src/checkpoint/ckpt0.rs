//! The release's `ckpt-0/` directory: one pickle per tensor, named by index
//! (`tensor{i:05d}_000` holds `expected_tensors(cfg)[i]`).

use super::{expected_tensors, pickle, CheckpointError, Result, StoredTensor, TensorSource};
use crate::bytes::ByteView;
use crate::config::ModelConfig;
use std::collections::{HashMap, HashSet};
use std::path::{Path, PathBuf};

/// `tensor{i:05d}_000`
pub fn file_name(i: usize) -> String {
    format!("tensor{i:05}_000")
}

/// Memory-maps one tensor pickle and interprets it; payloads view the mapping.
pub fn load_file(path: &Path) -> Result<StoredTensor> {
    let io = |source| CheckpointError::Io {
        path: path.to_path_buf(),
        source,
    };
    let file = std::fs::File::open(path).map_err(io)?;
    let len = file.metadata().map_err(io)?.len();
    let view = if len == 0 {
        // Nothing to map; the interpreter reports the empty file.
        ByteView::from_vec(Vec::new())
    } else {
        // SAFETY: the mapping is read-only; like every reader of mapped checkpoints we
        // require that the files are not modified while the model is loaded.
        let map = unsafe { memmap2::Mmap::map(&file) }.map_err(io)?;
        ByteView::from_mmap(map)
    };
    pickle::parse(view, path)
}

/// A release checkpoint directory, checked at `open` to hold exactly the files `cfg` needs.
pub struct Ckpt0Source {
    dir: PathBuf,
    /// Tensor names in file order.
    names: Vec<String>,
    index: HashMap<String, usize>,
}

impl Ckpt0Source {
    /// Opens `dir` for `cfg`, reporting every missing and unexpected `tensor*` file at once.
    pub fn open(dir: &Path, cfg: &ModelConfig) -> Result<Self> {
        let names: Vec<String> = expected_tensors(cfg).into_iter().map(|e| e.name).collect();
        let entries = std::fs::read_dir(dir).map_err(|source| CheckpointError::Io {
            path: dir.to_path_buf(),
            source,
        })?;
        let wanted: HashSet<String> = (0..names.len()).map(file_name).collect();
        let mut present = HashSet::new();
        let mut extra = Vec::new();
        for entry in entries {
            let entry = entry.map_err(|source| CheckpointError::Io {
                path: dir.to_path_buf(),
                source,
            })?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if wanted.contains(&name) {
                // `is_file` follows symlinks, so linked checkpoints work.
                if entry.path().is_file() {
                    present.insert(name);
                }
            } else if name.starts_with("tensor") {
                extra.push(name);
            }
        }
        extra.sort();

        let mut problems = Vec::new();
        for (i, n) in names.iter().enumerate() {
            let f = file_name(i);
            if !present.contains(&f) {
                problems.push(format!("missing file {f} (tensor '{n}')"));
            }
        }
        let missing = problems.len();
        for f in &extra {
            problems.push(format!(
                "unexpected file {f} (the config has {} tensors: {}..{})",
                names.len(),
                file_name(0),
                file_name(names.len().saturating_sub(1))
            ));
        }
        // Many missing or any extra files suggest a config for another model size.
        if !extra.is_empty() || missing > 1 {
            problems.push(format!(
                "the directory holds {} tensor files but the config expects {}: is config.json \
                 the one for this checkpoint?",
                present.len() + extra.len(),
                names.len()
            ));
        }
        if !problems.is_empty() {
            return Err(CheckpointError::Mismatch {
                origin: dir.to_path_buf(),
                problems,
            });
        }
        let index = names
            .iter()
            .enumerate()
            .map(|(i, n)| (n.clone(), i))
            .collect();
        Ok(Ckpt0Source {
            dir: dir.to_path_buf(),
            names,
            index,
        })
    }

    /// The file holding tensor `name`.
    pub fn path_of(&self, name: &str) -> Option<PathBuf> {
        self.index.get(name).map(|&i| self.dir.join(file_name(i)))
    }
}

impl TensorSource for Ckpt0Source {
    fn origin(&self) -> &Path {
        &self.dir
    }

    fn names(&self) -> Vec<String> {
        self.names.clone()
    }

    fn load(&self, name: &str) -> Result<StoredTensor> {
        let path = self
            .path_of(name)
            .ok_or_else(|| CheckpointError::MissingTensor {
                origin: self.dir.clone(),
                name: name.to_string(),
            })?;
        load_file(&path)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::checkpoint::{open_model, validate, DType};
    use crate::test_support::tiny_a_dir;

    fn tiny_cfg() -> ModelConfig {
        ModelConfig::from_json_file(&tiny_a_dir().join("config.json")).unwrap()
    }

    /// A writable copy of the fixture model (config.json + ckpt-0/) in a temp dir.
    fn copy_fixture() -> (tempfile::TempDir, PathBuf) {
        let tmp = tempfile::tempdir().unwrap();
        let model = tmp.path().join("model");
        let ckpt = model.join("ckpt-0");
        std::fs::create_dir_all(&ckpt).unwrap();
        let src = tiny_a_dir();
        // read + write rather than copy: the fixture files are read-only.
        let cfg = std::fs::read(src.join("config.json")).unwrap();
        std::fs::write(model.join("config.json"), cfg).unwrap();
        for e in std::fs::read_dir(src.join("ckpt-0")).unwrap() {
            let e = e.unwrap();
            std::fs::write(ckpt.join(e.file_name()), std::fs::read(e.path()).unwrap()).unwrap();
        }
        (tmp, model)
    }

    /// Replaces the first occurrence of `from` in file `i` of the copied checkpoint.
    fn patch(model: &Path, i: usize, from: &[u8], to: &[u8]) {
        let p = model.join("ckpt-0").join(file_name(i));
        let mut b = std::fs::read(&p).unwrap();
        let at = b.windows(from.len()).position(|w| w == from).unwrap();
        b.splice(at..at + from.len(), to.iter().copied());
        std::fs::write(&p, b).unwrap();
    }

    fn mismatch_problems(r: Result<impl Sized>) -> Vec<String> {
        match r {
            Err(CheckpointError::Mismatch { problems, .. }) => problems,
            Err(e) => panic!("expected a mismatch, got: {e}"),
            Ok(_) => panic!("expected a mismatch, got Ok"),
        }
    }

    #[test]
    fn loads_every_fixture_tensor_as_the_manifest_says() {
        let dir = tiny_a_dir();
        let text = std::fs::read_to_string(dir.join("ckpt-0-manifest.json")).unwrap();
        let manifest: Vec<serde_json::Value> = serde_json::from_str(&text).unwrap();
        let src = Ckpt0Source::open(&dir.join("ckpt-0"), &tiny_cfg()).unwrap();
        assert_eq!(manifest.len(), 38);
        let names = src.names();
        assert_eq!(names.len(), manifest.len());
        for (i, m) in manifest.iter().enumerate() {
            let name = m["path"].as_str().unwrap();
            assert_eq!(m["index"].as_u64(), Some(i as u64));
            assert_eq!(names[i], name);
            let shape: Vec<usize> = serde_json::from_value(m["shape"].clone()).unwrap();
            match src.load(name).unwrap() {
                StoredTensor::Plain(t) => {
                    assert!(m.get("quantized").is_none(), "{name}");
                    assert_eq!(t.shape, shape, "{name}");
                    assert_eq!(t.dtype, DType::F32, "{name}");
                }
                StoredTensor::Quantized { weight, scales } => {
                    assert_eq!(m["quantized"], true, "{name}");
                    let ss: Vec<usize> = serde_json::from_value(m["scales_shape"].clone()).unwrap();
                    assert_eq!(weight.shape, shape, "{name}");
                    assert_eq!(weight.dtype, DType::I8, "{name}");
                    assert_eq!(scales.shape, ss, "{name}");
                    assert_eq!(scales.dtype, DType::BF16, "{name}");
                }
            }
        }
        validate(&src, &tiny_cfg()).unwrap();
        match src.load("no/such/tensor") {
            Err(CheckpointError::MissingTensor { name, .. }) => assert_eq!(name, "no/such/tensor"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn open_model_accepts_the_fixture() {
        let m = open_model(&tiny_a_dir()).unwrap();
        assert_eq!(m.config.num_hidden_layers, 3);
        assert_eq!(m.source.names().len(), 38);
        // The ckpt-0 directory itself, with the config beside it.
        let m = open_model(&tiny_a_dir().join("ckpt-0")).unwrap();
        assert_eq!(m.source.names().len(), 38);
    }

    #[test]
    fn truncated_file_error_names_the_file() {
        let (_tmp, model) = copy_fixture();
        let p = model.join("ckpt-0").join(file_name(2));
        let b = std::fs::read(&p).unwrap();
        std::fs::write(&p, &b[..b.len() / 2]).unwrap();
        let src = Ckpt0Source::open(&model.join("ckpt-0"), &tiny_cfg()).unwrap();
        let err = src
            .load("transformer/decoder_layer_0/moe/linear/w")
            .unwrap_err();
        let text = err.to_string();
        assert!(
            matches!(&err, CheckpointError::Pickle { file, offset: 196, .. } if *file == p),
            "{text}"
        );
        assert!(
            text.contains("tensor00002_000") && text.contains("truncated"),
            "{text}"
        );
        // An empty file too.
        std::fs::write(&p, b"").unwrap();
        let text = src
            .load("transformer/decoder_layer_0/moe/linear/w")
            .unwrap_err()
            .to_string();
        assert!(
            text.contains("tensor00002_000") && text.contains("empty file"),
            "{text}"
        );
        // open_model reports it among the mismatches.
        let problems = mismatch_problems(open_model(&model));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(problems[0].contains("tensor00002_000"), "{problems:?}");
    }

    #[test]
    fn missing_and_extra_files_are_all_reported() {
        let (_tmp, model) = copy_fixture();
        let ckpt = model.join("ckpt-0");
        std::fs::remove_file(ckpt.join(file_name(5))).unwrap();
        let problems = mismatch_problems(open_model(&model));
        assert_eq!(problems.len(), 1, "{problems:?}");
        assert!(
            problems[0].contains("missing file tensor00005_000")
                && problems[0].contains("multi_head_attention/key/w"),
            "{problems:?}"
        );
        std::fs::remove_file(ckpt.join(file_name(37))).unwrap();
        std::fs::write(ckpt.join(file_name(38)), b"").unwrap();
        std::fs::write(ckpt.join("tensor00001_001"), b"").unwrap();
        std::fs::write(ckpt.join("README"), b"other files are ignored").unwrap();
        let problems = mismatch_problems(Ckpt0Source::open(&ckpt, &tiny_cfg()));
        let all = problems.join("\n");
        assert_eq!(problems.len(), 5, "{all}");
        assert!(all.contains("missing file tensor00005_000"), "{all}");
        assert!(all.contains("missing file tensor00037_000"), "{all}");
        assert!(all.contains("unexpected file tensor00001_001"), "{all}");
        assert!(all.contains("unexpected file tensor00038_000"), "{all}");
        assert!(
            all.contains("is config.json the one for this checkpoint"),
            "{all}"
        );
        // The grok-1 config expects 770 files.
        let problems = mismatch_problems(Ckpt0Source::open(&ckpt, &ModelConfig::grok1()));
        assert!(problems
            .iter()
            .any(|p| p.contains("missing file tensor00769_000")));
    }

    #[test]
    fn file_removed_after_open_is_named() {
        let (_tmp, model) = copy_fixture();
        let ckpt = model.join("ckpt-0");
        let src = Ckpt0Source::open(&ckpt, &tiny_cfg()).unwrap();
        std::fs::remove_file(ckpt.join(file_name(1))).unwrap();
        let err = src.load(crate::checkpoint::layout::FINAL_NORM).unwrap_err();
        assert!(matches!(&err, CheckpointError::Io { .. }), "{err}");
        assert!(err.to_string().contains("tensor00001_000"), "{err}");
    }

    #[test]
    fn wrong_dtypes_fail_validation_naming_the_tensor_or_file() {
        let key = "transformer/decoder_layer_0/multi_head_attention/key/w";
        // uint8 parses, and validation refuses it for a quantized weight.
        let (_tmp, model) = copy_fixture();
        patch(&model, 5, b"\x8c\x02i1", b"\x8c\x02u1");
        let problems = mismatch_problems(open_model(&model));
        assert_eq!(
            problems,
            vec![format!("'{key}': weight dtype uint8, expected int8")]
        );

        // float64 and int16 are refused by the reader; validation names the file.
        for (code, what) in [(&b"f8"[..], "float64"), (&b"i2"[..], "int16")] {
            let (_tmp, model) = copy_fixture();
            let mut to = b"\x8c\x02".to_vec();
            to.extend_from_slice(code);
            patch(&model, 5, b"\x8c\x02i1", &to);
            let problems = mismatch_problems(open_model(&model));
            assert_eq!(problems.len(), 1, "{problems:?}");
            assert!(
                problems[0].contains("tensor00005_000") && problems[0].contains(what),
                "{problems:?}"
            );
        }

        // A float32 norm stored as int32 is a plain non-float array.
        let (_tmp, model) = copy_fixture();
        patch(&model, 1, b"\x8c\x02f4", b"\x8c\x02i4");
        let problems = mismatch_problems(open_model(&model));
        assert_eq!(
            problems,
            vec!["'language_model/rms_norm/scale': dtype int32, expected a float type".to_string()]
        );
    }

    #[test]
    fn a_swapped_file_is_caught_by_validation() {
        // Two files exchanged: each parses but holds the wrong shape or kind.
        let (_tmp, model) = copy_fixture();
        let ckpt = model.join("ckpt-0");
        let (a, b) = (ckpt.join(file_name(1)), ckpt.join(file_name(2)));
        let (ba, bb) = (std::fs::read(&a).unwrap(), std::fs::read(&b).unwrap());
        std::fs::write(&a, bb).unwrap();
        std::fs::write(&b, ba).unwrap();
        let all = mismatch_problems(open_model(&model)).join("\n");
        assert!(
            all.contains("'language_model/rms_norm/scale': stored quantized"),
            "{all}"
        );
        assert!(
            all.contains("moe/linear/w': stored as a plain array"),
            "{all}"
        );
    }
}
