//! Per-sequence key/value cache: for each layer, keys and values of every past position,
//! `[positions, kv_heads, head_dim]` in f32, grown as tokens are appended.

#[derive(Debug, Clone)]
pub struct KvCache {
    pub(crate) keys: Vec<Vec<f32>>,
    pub(crate) values: Vec<Vec<f32>>,
    kv_dim: usize,
    len: usize,
}

impl KvCache {
    pub fn new(layers: usize, kv_dim: usize) -> Self {
        KvCache {
            keys: vec![Vec::new(); layers],
            values: vec![Vec::new(); layers],
            kv_dim,
            len: 0,
        }
    }

    /// Positions held (the position the next token gets).
    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn kv_dim(&self) -> usize {
        self.kv_dim
    }

    /// Bytes held by keys and values.
    pub fn nbytes(&self) -> usize {
        self.keys
            .iter()
            .chain(&self.values)
            .map(|v| v.len() * 4)
            .sum()
    }

    /// Drops everything after the first `len` positions (e.g. to reuse a prompt prefix).
    pub fn truncate(&mut self, len: usize) {
        if len < self.len {
            for v in self.keys.iter_mut().chain(self.values.iter_mut()) {
                v.truncate(len * self.kv_dim);
            }
            self.len = len;
        }
    }

    /// Marks `n` more positions as filled once every layer has appended them.
    pub(crate) fn advance(&mut self, n: usize) {
        self.len += n;
    }
}
