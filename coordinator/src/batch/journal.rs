//! The results file, written so that a run killed at any moment can be resumed: each result
//! is one line appended with a single write and synced to disk before the next; on reopening,
//! a torn last line (the kill hit mid-write) is cut off and every complete line's key is
//! known done.

use super::BatchError;
use serde_json::Value;
use std::collections::HashSet;
use std::fs::{File, OpenOptions};
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

pub struct Journal {
    file: File,
    path: PathBuf,
}

/// What identifies a result: its `custom_id`, or its `id` for a line that had none usable.
/// `None` for anything that is not a result line.
pub fn result_key(v: &Value) -> Option<String> {
    if v.get("response").is_none() && v.get("error").is_none() {
        return None;
    }
    match (&v["custom_id"], &v["id"]) {
        (Value::String(c), _) => Some(c.clone()),
        (Value::Null, Value::String(id)) => Some(id.clone()),
        _ => None,
    }
}

impl Journal {
    /// Opens (or creates) `path` for appending; returns the keys of the results it holds.
    pub fn open(path: &Path) -> Result<(Journal, HashSet<String>), BatchError> {
        let io = |source| BatchError::Io {
            path: path.to_path_buf(),
            source,
        };
        let mut file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)
            .map_err(io)?;
        let mut bytes = Vec::new();
        file.read_to_end(&mut bytes).map_err(io)?;
        // Everything after the last newline is a torn write, dropped once the complete lines
        // show that this is a results file.
        let whole = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
        let mut done = HashSet::new();
        for (i, line) in bytes[..whole].split(|&b| b == b'\n').enumerate() {
            if line.iter().all(u8::is_ascii_whitespace) {
                continue;
            }
            let key = serde_json::from_slice::<Value>(line)
                .ok()
                .as_ref()
                .and_then(result_key)
                .ok_or_else(|| BatchError::NotAResultsFile {
                    path: path.to_path_buf(),
                    line: i + 1,
                })?;
            done.insert(key);
        }
        if whole < bytes.len() {
            file.set_len(whole as u64).map_err(io)?;
        }
        file.seek(SeekFrom::End(0)).map_err(io)?;
        Ok((
            Journal {
                file,
                path: path.to_path_buf(),
            },
            done,
        ))
    }

    /// Appends one result line and waits until it is on disk.
    pub fn append(&mut self, v: &Value) -> Result<(), BatchError> {
        let mut line = v.to_string();
        line.push('\n');
        let io = |source| BatchError::Io {
            path: self.path.clone(),
            source,
        };
        self.file.write_all(line.as_bytes()).map_err(io)?;
        self.file.sync_data().map_err(io)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn reopening_cuts_a_torn_line_and_knows_what_is_done() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("out.jsonl");
        {
            let (mut j, done) = Journal::open(&path).unwrap();
            assert!(done.is_empty());
            j.append(&json!({"id": "r1", "custom_id": "a", "error": null}))
                .unwrap();
            j.append(&json!({"id": "batch_req_7", "custom_id": null, "error": {}}))
                .unwrap();
        }
        // A kill in the middle of the third write.
        let mut f = OpenOptions::new().append(true).open(&path).unwrap();
        f.write_all(b"{\"id\":\"r3\",\"cust").unwrap();
        drop(f);
        let (mut j, done) = Journal::open(&path).unwrap();
        assert_eq!(
            done,
            HashSet::from(["a".to_string(), "batch_req_7".to_string()])
        );
        j.append(&json!({"id": "r3", "custom_id": "c", "error": null}))
            .unwrap();
        let text = std::fs::read_to_string(&path).unwrap();
        assert_eq!(text.lines().count(), 3);
        assert!(text.ends_with("\"id\":\"r3\"}\n"), "{text}");
    }

    #[test]
    fn a_file_that_is_not_results_is_left_alone() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("notes.txt");
        // Not results: plain text, and a batch input line (it has a custom_id too).
        let input = r#"{"custom_id":"a","method":"POST","url":"/v1/completions","body":{}}"#;
        for text in ["hello\nworld", &format!("{input}\n{input}")] {
            std::fs::write(&path, text).unwrap();
            let e = Journal::open(&path).err().unwrap();
            assert!(
                matches!(e, BatchError::NotAResultsFile { line: 1, .. }),
                "{e}"
            );
            assert_eq!(std::fs::read_to_string(&path).unwrap(), text);
        }
    }
}
